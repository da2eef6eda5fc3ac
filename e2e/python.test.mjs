// Raw-mode interop with Python: the terminal client of the WebSocket chat
// tutorials (examples/python/chat.py, on the websockets package) and the
// chat page in the same room, both ways, with no roomcast library.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { after, before, test } from "node:test";
import { launchBrowser, openPage, removeBuilds, runPythonChat, startExample } from "./lib/harness.mjs";

let browser;
let server;

before(async () => {
  [browser, server] = await Promise.all([launchBrowser(), startExample("chat")]);
});

after(async () => {
  await browser?.close();
  if (server) assert.equal(await server.stop(), 0, "the chat server did not shut down cleanly");
  removeBuilds();
});

/** Opens the chat as nick in room; the page is closed when test t ends. */
async function openRoom(t, nick, room) {
  const page = await openPage(browser, `${server.url}/?nick=${nick}&room=${room}`);
  t.after(() => page.context().close());
  await page.locator('#status[data-state="open"]').waitFor();
  await page.locator("#members li.you").waitFor(); // subscribed
  return page;
}

const ws = (srv, query) => `${srv.url.replace(/^http/, "ws")}/ws${query}`;

test("lines typed in the Python client reach a page, the page's messages reach it, and Ctrl-D leaves cleanly", async (t) => {
  const ann = await openRoom(t, "ann", "python");
  const py = runPythonChat(ws(server, "?room=python"));
  t.after(() => py.stop());
  await ann.locator("#members li", { hasText: "anonymous" }).waitFor(); // it is in the room

  py.type("hello from python");
  await ann.locator("#log li.raw", { hasText: "hello from python" }).waitFor();

  await ann.fill("#text", "hi python, from the page");
  await ann.press("#text", "Enter");
  // The page publishes JSON; a raw client gets those bytes verbatim.
  await py.waitFor('{"nick":"ann","text":"hi python, from the page"}');

  assert.equal(await py.end(), 0, `the Python client failed:\n${py.stderr}`);
  assert.match(py.stderr, /closed: 1000 bye/);
  await ann.locator("#members li", { hasText: "anonymous" }).waitFor({ state: "detached" });
  assert.deepEqual(ann.errors, []);
});

test("the Python client with ?history= first prints what the room said before it came", async (t) => {
  const ann = await openRoom(t, "ann", "pyhistory");
  for (const text of ["first", "second"]) {
    await ann.fill("#text", text);
    await ann.press("#text", "Enter");
    await ann.locator("#log li.chat", { hasText: text }).waitFor();
  }
  const py = runPythonChat(ws(server, "?room=pyhistory&history=5"));
  t.after(() => py.stop());
  await py.waitFor('{"nick":"ann","text":"second"}');
  assert.ok(py.stdout.indexOf('"text":"first"') < py.stdout.indexOf('"text":"second"'), `out of order:\n${py.stdout}`);
});

test("a chat server shutting down closes the Python client with 1001, and it exits cleanly", async (t) => {
  const other = await startExample("chat");
  const py = runPythonChat(ws(other, "?room=lobby"));
  t.after(() => py.stop());
  // It is connected once its line comes back to it (raw clients in a room get every message of it).
  py.type("are you there");
  await py.waitFor("are you there");
  assert.equal(await other.stop(), 0, "the second chat server did not shut down cleanly");
  assert.equal(await py.exited, 0, `the Python client failed:\n${py.stderr}`);
  assert.match(py.stderr, /closed: 1001/);
});

test("a Python client's pings are answered with their own payload, and the connection still delivers after them", async (t) => {
  // websockets pings every 20 s by default and closes the connection when
  // a pong is late or does not carry its ping's payload; the Handler
  // answers pings between messages itself (the connection then parks
  // again), so its pongs must be exactly right.
  const ann = await openRoom(t, "ann", "pyping");
  const script = `
import asyncio, sys, websockets
async def main():
    async with websockets.connect(sys.argv[1], ping_interval=None) as ws:
        for i in range(3):
            waiter = await ws.ping(b"roomcast-%d" % i)
            await asyncio.wait_for(waiter, 10)
            print("pong", i, flush=True)
            await asyncio.sleep(0.3)
        print(await asyncio.wait_for(ws.recv(), 10), flush=True)
asyncio.run(main())
`;
  const py = spawn(process.env.PYTHON ?? "/usr/bin/python3", ["-c", script, ws(server, "?room=pyping")], { stdio: ["ignore", "pipe", "pipe"] });
  t.after(() => py.kill());
  let out = "";
  let err = "";
  py.stdout.setEncoding("utf8").on("data", (s) => { out += s; });
  py.stderr.setEncoding("utf8").on("data", (s) => { err += s; });
  const exited = new Promise((resolve) => py.once("exit", (code) => resolve(code)));
  await ann.locator("#members li", { hasText: "anonymous" }).waitFor(); // in the room
  while (!out.includes("pong 2")) {
    if (py.exitCode !== null) assert.fail(`the Python client ended early:\n${out}\n${err}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  await ann.fill("#text", "after the pings");
  await ann.press("#text", "Enter");
  assert.equal(await exited, 0, `the Python client failed:\n${out}\n${err}`);
  assert.match(out, /pong 0\npong 1\npong 2\n.*after the pings/s);
});
