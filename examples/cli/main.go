// Command cli is a terminal client for roomcast rooms: lines you type are
// published into the room, and the room's messages are printed as they
// arrive, while you type. It speaks either mode:
//
//	go run ./examples/cli -room lobby -nick ann                 # raw mode
//	go run ./examples/cli -room lobby -nick ann -protocol       # protocol mode (history, presence, recovery)
//	go run ./examples/cli -url ws://127.0.0.1:8081/ws -room ticker:BTC -protocol
//
// Against examples/chat, lines travel as the chat expects: "nick: text"
// in raw mode, {"nick":…,"text":…} in protocol mode, and both kinds are
// printed as "nick: text". Against examples/ticker it prints the prices
// (the ticker refuses publishes, and the refusal is printed). End with
// Ctrl-D or Ctrl-C.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub/client"
)

type config struct {
	url      string // the endpoint, ws:// or wss://
	room     string
	nick     string // prefixes what you type; empty sends lines as they are
	protocol bool   // roomcast.v1 instead of raw mode
	history  int    // protocol mode: messages to show first
}

func main() {
	var cfg config
	flag.StringVar(&cfg.url, "url", "ws://127.0.0.1:8080/ws", "the roomcast endpoint")
	flag.StringVar(&cfg.room, "room", "lobby", "the room to join")
	flag.StringVar(&cfg.nick, "nick", "", "your name, sent with each line")
	flag.BoolVar(&cfg.protocol, "protocol", false, "speak protocol mode (roomcast.v1) instead of raw mode")
	flag.IntVar(&cfg.history, "history", 10, "protocol mode: recent messages to show first")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, os.Stdin, os.Stdout); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "cli:", err)
		os.Exit(1)
	}
}

// run joins the room and copies lines from in to the room and the room's
// messages to out, until in ends, ctx ends, or the connection fails.
func run(ctx context.Context, cfg config, in io.Reader, out io.Writer) error {
	w := &lineWriter{w: out}
	if cfg.protocol {
		return runProtocol(ctx, cfg, in, w)
	}
	return runRaw(ctx, cfg, in, w)
}

// lineWriter prints whole lines from several goroutines.
type lineWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lineWriter) println(a ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintln(l.w, a...)
}

func runRaw(ctx context.Context, cfg config, in io.Reader, out *lineWriter) error {
	u, err := url.Parse(cfg.url)
	if err != nil {
		return err
	}
	q := u.Query()
	q.Set("room", cfg.room)
	u.RawQuery = q.Encode()
	c, _, err := websocket.Dial(ctx, u.String(), nil)
	if err != nil {
		return err
	}
	defer c.CloseNow()
	c.SetReadLimit(-1)
	out.println("joined", cfg.room, "in raw mode; type lines to send them")

	readErr := make(chan error, 1)
	var reading sync.WaitGroup
	defer reading.Wait()
	defer c.CloseNow() // ends the reader below before the Wait (defers run last-in first-out)
	reading.Add(1)
	go func() { // prints until the connection ends
		defer reading.Done()
		for {
			typ, b, err := c.Read(ctx)
			if err != nil {
				readErr <- err
				return
			}
			if typ == websocket.MessageBinary {
				out.println(fmt.Sprintf("(%d binary bytes)", len(b)))
				continue
			}
			out.println(render(b))
		}
	}()
	done := make(chan struct{})
	defer close(done)
	lines := scanLines(in, done)
	for {
		select {
		case <-ctx.Done():
			c.Close(websocket.StatusNormalClosure, "")
			return ctx.Err()
		case err := <-readErr:
			return fmt.Errorf("the connection ended: %w", err)
		case line, ok := <-lines:
			if !ok {
				return c.Close(websocket.StatusNormalClosure, "")
			}
			if cfg.nick != "" {
				line = cfg.nick + ": " + line
			}
			if err := c.Write(ctx, websocket.MessageText, []byte(line)); err != nil {
				return err
			}
		}
	}
}

func runProtocol(ctx context.Context, cfg config, in io.Reader, out *lineWriter) error {
	c, err := client.Dial(ctx, cfg.url, client.WithOnState(func(s client.State, err error) {
		if err != nil {
			out.println("(", s, ":", err, ")")
		}
	}))
	if err != nil {
		return err
	}
	defer c.Close()
	opts := []client.SubscribeOption{client.OnRecover(func(r client.Recovery) {
		if r.Recovered {
			out.println(fmt.Sprintf("(reconnected: %d missed messages follow)", r.Missed))
		} else {
			out.println("(reconnected, but missed messages are lost:", r.Reason, ")")
		}
	})}
	if cfg.history > 0 {
		opts = append(opts, client.History(cfg.history))
	}
	if cfg.nick != "" {
		info, _ := json.Marshal(map[string]string{"name": cfg.nick})
		opts = append(opts, client.Info(info))
	}
	if _, err := c.Subscribe(ctx, cfg.room, func(m client.Message) { out.println(render(m.Data)) }, opts...); err != nil {
		return err
	}
	out.println("joined", cfg.room, "in protocol mode; type lines to send them")

	done := make(chan struct{})
	defer close(done)
	lines := scanLines(in, done)
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-c.Done():
			return fmt.Errorf("the connection ended: %w", c.Err())
		case line, ok := <-lines:
			if !ok {
				return nil
			}
			payload := []byte(line)
			if cfg.nick != "" {
				payload, _ = json.Marshal(map[string]string{"nick": cfg.nick, "text": line})
			}
			if _, err := c.Publish(ctx, cfg.room, payload); err != nil {
				out.println("(not sent:", err, ")") // e.g. forbidden on a read-only room
			}
		}
	}
}

// render prints a payload: {"nick","text"} as "nick: text", other bytes as
// they are.
func render(b []byte) string {
	var m struct {
		Nick *string `json:"nick"`
		Text *string `json:"text"`
	}
	if json.Unmarshal(b, &m) == nil && m.Nick != nil && m.Text != nil {
		return *m.Nick + ": " + *m.Text
	}
	return strings.TrimRight(string(b), "\n")
}

// scanLines sends each line of in on the returned channel, closing it at
// the end of in. Its goroutine ends with in (a terminal's Ctrl-D, a closed
// pipe), or at the next line once done is closed.
func scanLines(in io.Reader, done <-chan struct{}) <-chan string {
	lines := make(chan string)
	go func() {
		defer close(lines)
		s := bufio.NewScanner(in)
		for s.Scan() {
			select {
			case lines <- s.Text():
			case <-done:
				return
			}
		}
	}()
	return lines
}
