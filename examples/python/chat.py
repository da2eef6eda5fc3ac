#!/usr/bin/env python3
"""A terminal chat client in Python, for roomcast's raw mode.

The client of the WebSocket chat tutorials, with no roomcast library: raw
mode is plain WebSocket. Every line typed is sent to the room, every
message of the room is printed on a line of its own; the end of input
(Ctrl-D) closes the connection with 1000, and a close by the server is
printed to stderr with its code and reason.

    sudo apt-get install python3-websockets    # or: pip install websockets
    go run ./examples/chat &
    python3 examples/python/chat.py 'ws://127.0.0.1:8080/ws?room=lobby'

With no ?room= the chat example puts a raw client in its lobby
(WithDefaultRoom); ?history=20 first replays the room's last 20 messages.
Tested with the websockets package 10.4 (Debian 12's python3-websockets):
its asyncio API, which later versions keep.
"""

import asyncio
import sys
import threading

import websockets


def read_lines(loop, lines):
    """Reads standard input on a thread of its own (a blocking read), and
    hands each line to the event loop; None says the input ended. The
    thread is a daemon: it never keeps the client from exiting."""
    for line in sys.stdin:
        loop.call_soon_threadsafe(lines.put_nowait, line.rstrip("\r\n"))
    loop.call_soon_threadsafe(lines.put_nowait, None)


async def send_lines(ws, lines):
    while (line := await lines.get()) is not None:
        if line:
            await ws.send(line)
    await ws.close(1000, "bye")


async def print_messages(ws):
    async for message in ws:
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        print(message, flush=True)


async def main(url):
    lines = asyncio.Queue()
    threading.Thread(target=read_lines, args=(asyncio.get_running_loop(), lines), daemon=True).start()
    async with websockets.connect(url) as ws:
        printer = asyncio.create_task(print_messages(ws))
        sender = asyncio.create_task(send_lines(ws, lines))
        await printer  # ends when the connection closes, by either side
        sender.cancel()
        print(f"closed: {ws.close_code} {ws.close_reason}".rstrip(), file=sys.stderr, flush=True)
        return 0 if ws.close_code in (1000, 1001) else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: chat.py ws://HOST:PORT/ws?room=ROOM")
    sys.exit(asyncio.run(main(sys.argv[1])))
