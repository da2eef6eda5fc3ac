// Shared helpers of the end-to-end suite: build and run the example
// servers, drive Debian's Chromium through playwright-core, run wscat, and
// a TCP proxy that can cut connections. No test framework beyond node:test.

import { execFile, spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { chromium } from "playwright-core";

export const e2eDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
export const repoRoot = path.resolve(e2eDir, "..");

/** How long any one wait may take. Generous: CI machines are small and shared. */
export const TIMEOUT = 15_000;

// Child processes still running when this test process exits (a test
// failed half-way) are killed rather than left behind.
const children = new Set();
process.on("exit", () => {
  for (const proc of children) proc.kill("SIGKILL");
});

function track(proc) {
  children.add(proc);
  proc.once("exit", () => children.delete(proc));
  return proc;
}

// ---- example servers ----

let binDir = null;
const builds = new Map();

/**
 * Builds ./examples/<name> once per test process into a temporary
 * directory and resolves to the binary's path.
 */
export function buildExample(name) {
  return buildProgram(".", `./examples/${name}`);
}

/**
 * Builds the package pkg of the Go module in moduleDir (relative to the
 * repository: "." or a broker's module) once per test process.
 */
export function buildProgram(moduleDir, pkg) {
  const key = `${moduleDir}:${pkg}`;
  if (!builds.has(key)) {
    binDir ??= mkdtempSync(path.join(tmpdir(), "roomcast-e2e-"));
    const out = path.join(binDir, key.replace(/[^A-Za-z0-9]+/g, "-"));
    builds.set(key, promisify(execFile)("go", ["build", "-o", out, pkg], { cwd: path.join(repoRoot, moduleDir), timeout: 300_000 })
      .then(() => out, (err) => { throw new Error(`go build ${pkg} (in ${moduleDir}) failed:\n${err.stderr || err.message}`); }));
  }
  return builds.get(key);
}

/** Removes the built binaries; call it from after(). */
export function removeBuilds() {
  if (binDir) rmSync(binDir, { recursive: true, force: true });
  binDir = null;
  builds.clear();
}

/**
 * Starts an example server on a free loopback port (-addr 127.0.0.1:0) and
 * resolves once it printed the address it listens on, in the line
 * "... listening on http://HOST:PORT". stop() sends SIGTERM (a graceful
 * shutdown) and resolves to the exit code.
 */
export async function startExample(name) {
  return startProgram(await buildExample(name), ["-addr", "127.0.0.1:0"], /listening on (http:\/\/\S+)/, name);
}

/**
 * Starts a built program and resolves once a line of its output matches
 * ready, whose first group is the URL it serves; stop() as for examples.
 */
export async function startProgram(bin, args, ready, name = path.basename(bin)) {
  const proc = track(spawn(bin, args, { stdio: ["ignore", "pipe", "pipe"] }));
  let stderr = "";
  proc.stderr.setEncoding("utf8").on("data", (s) => { stderr = (stderr + s).slice(-8000); });
  const exited = new Promise((resolve) => proc.once("exit", (code, signal) => resolve(code ?? signal)));

  const url = await new Promise((resolve, reject) => {
    let settled = false;
    const timer = setTimeout(() => fail(new Error(`${name} printed no listening line within ${TIMEOUT} ms`)), TIMEOUT);
    const lines = createInterface({ input: proc.stdout });
    function fail(err) {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      proc.kill("SIGKILL");
      reject(new Error(`${err.message}\nstderr:\n${stderr}`));
    }
    lines.on("line", (line) => {
      const m = ready.exec(line);
      if (m && !settled) {
        settled = true;
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    exited.then((code) => fail(new Error(`${name} exited (${code}) before listening`)));
  });

  const { port } = new URL(url);
  return {
    url,
    port: Number(port),
    proc,
    exited,
    /** Stops it like Ctrl-C would; resolves to the exit code (0 after a clean shutdown). */
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return exited;
      proc.kill("SIGTERM");
      const timer = setTimeout(() => proc.kill("SIGKILL"), TIMEOUT);
      const code = await exited;
      clearTimeout(timer);
      return code;
    },
  };
}

// ---- the browser ----

/** The flags Debian's Chromium runs with here: headless, no sandbox (root in a container), no network of its own. */
export const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/**
 * Launches the system's Chromium (never a downloaded one) with a fresh
 * profile: playwright-core's launch() creates a temporary user-data-dir
 * and removes it on close. Each newContext() is then a separate, empty
 * profile (its own localStorage), like another person's browser.
 */
export function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
    headless: true, // passes --headless
    args: CHROMIUM_ARGS,
    timeout: 60_000,
  });
}

/**
 * Opens url in a new browser context. The returned page records uncaught
 * page exceptions in page.errors, for tests to assert there were none.
 */
export async function openPage(browser, url) {
  const context = await browser.newContext({ viewport: { width: 1000, height: 700 } });
  context.setDefaultTimeout(TIMEOUT);
  const page = await context.newPage();
  page.errors = [];
  page.on("pageerror", (err) => page.errors.push(String(err)));
  await page.goto(url);
  return page;
}

/** Saves a screenshot when E2E_SCREENSHOTS names a directory; for looking, not for asserting. */
export async function snap(page, name) {
  const dir = process.env.E2E_SCREENSHOTS;
  if (!dir) return;
  mkdirSync(dir, { recursive: true });
  await page.screenshot({ path: path.join(dir, `${name}.png`) });
}

/** A short random suffix, so each test has rooms of its own. */
export function uniq() {
  return Math.random().toString(36).slice(2, 8);
}

// ---- terminal clients: wscat, Python ----

const wscatBin = path.join(e2eDir, "node_modules", "wscat", "bin", "wscat");

/**
 * Runs the pinned wscat with args. Its stdin is a pipe, held open until
 * the process ends (wscat quits when its input ends). The result collects
 * stdout without terminal escapes, and can wait for text in it.
 */
export function runWscat(args) {
  return runTerminal("wscat", process.execPath, [wscatBin, ...args]);
}

/** The Python chat client of examples/python, run by Debian's python3 (python3-websockets). */
export function runPythonChat(url) {
  return runTerminal("the Python client", process.env.PYTHON ?? "/usr/bin/python3", [path.join(repoRoot, "examples", "python", "chat.py"), url]);
}

/**
 * Runs a terminal program (name is for messages) with its stdin a pipe,
 * held open until stop() or end(); collects its stdout without terminal
 * escapes, and can wait for text in it.
 */
function runTerminal(name, bin, args) {
  const proc = track(spawn(bin, args, { stdio: ["pipe", "pipe", "pipe"] }));
  let out = "";
  let err = "";
  const waiters = new Set();
  const check = () => {
    for (const w of waiters) {
      if (out.includes(w.text)) {
        waiters.delete(w);
        clearTimeout(w.timer);
        w.resolve();
      }
    }
  };
  proc.stdout.setEncoding("utf8").on("data", (s) => {
    out += s.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, ""); // colours and cursor moves
    check();
  });
  proc.stderr.setEncoding("utf8").on("data", (s) => { err += s; });
  const exited = new Promise((resolve) => proc.once("exit", (code, signal) => resolve(code ?? signal)));
  return {
    proc,
    exited,
    get stdout() { return out; },
    get stderr() { return err; },
    /** Resolves once stdout contains text. */
    waitFor(text, timeout = TIMEOUT) {
      return new Promise((resolve, reject) => {
        const w = { text, resolve };
        w.timer = setTimeout(() => {
          waiters.delete(w);
          reject(new Error(`${name} did not print ${JSON.stringify(text)} within ${timeout} ms; stdout:\n${out}\nstderr:\n${err}`));
        }, timeout);
        waiters.add(w);
        check();
      });
    },
    /** Types a line, as a person at the terminal would. */
    type(line) {
      proc.stdin.write(line + "\n");
    },
    /** Ends its input, as Ctrl-D at a terminal does; resolves with its exit code. */
    end() {
      proc.stdin.end();
      return exited;
    },
    /** Ends it: closes stdin, then kills it if it is still running. */
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return exited;
      proc.stdin.end();
      const timer = setTimeout(() => proc.kill("SIGKILL"), 5000);
      proc.kill("SIGTERM");
      const code = await exited;
      clearTimeout(timer);
      return code;
    },
  };
}

// ---- a TCP proxy that can cut the line ----

/**
 * A loopback TCP proxy in front of a server. cut() destroys every proxied
 * connection and refuses new ones until restore(): to the browser it is
 * the network failing, while the server keeps running (and keeps its
 * rooms' history). retarget() points later connections at another server.
 * dropAcks(n) cuts a connection at the worst moment for a publish, n
 * times: the server has the message, and its ack is on the way back.
 */
export async function startProxy(upstreamPort) {
  let target = upstreamPort;
  let up = true;
  let acksToDrop = 0;
  let blockWebSockets = false;
  const open = new Set();
  const server = net.createServer((client) => {
    if (!up) {
      client.destroy();
      return;
    }
    if (blockWebSockets) {
      // A gateway that breaks WebSocket: an upgrade request is dropped,
      // every other request goes through.
      client.once("data", (first) => {
        if (/^upgrade:\s*websocket/im.test(first.toString("latin1"))) {
          client.destroy();
          return;
        }
        client.pause();
        client.unshift(first);
        connect(client);
        client.resume();
      });
      return;
    }
    connect(client);
  });
  function connect(client) {
    const upstream = net.connect(target, "127.0.0.1");
    const pair = { client, upstream };
    open.add(pair);
    const end = () => {
      open.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    for (const s of [client, upstream]) {
      s.on("error", end);
      s.on("close", end);
    }
    client.pipe(upstream);
    // Server to browser: read frame by frame (the server's frames are not
    // masked), so a publish's ack can be dropped with its connection.
    const frames = serverFrames((frame) => {
      if (acksToDrop > 0 && isPublishAck(frame)) {
        acksToDrop--;
        end();
        return;
      }
      client.write(frame);
    });
    upstream.on("data", frames);
  }
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const { port } = server.address();
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    /** Drops every connection now, and every new one until restore(). */
    cut() {
      up = false;
      for (const { client, upstream } of open) {
        client.destroy();
        upstream.destroy();
      }
      open.clear();
    },
    restore() {
      up = true;
    },
    retarget(port) {
      target = port;
    },
    /** From now on WebSocket upgrades are dropped (blocked: true), or let through again. */
    blockWebSockets(blocked) {
      blockWebSockets = blocked;
    },
    /** The next n acks of a publish never arrive: their connection is cut instead. */
    dropAcks(n) {
      acksToDrop += n;
    },
    /** How many acks dropAcks still has to drop. */
    get acksToDrop() {
      return acksToDrop;
    },
    close() {
      this.cut();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

/**
 * Splits a server-to-browser byte stream into the HTTP response head and,
 * after a 101 (a WebSocket), whole frames (unmasked, as a server's are),
 * calling emit with each piece to forward. Plain HTTP responses pass
 * through as they come.
 */
function serverFrames(emit) {
  let buf = Buffer.alloc(0);
  let mode = "head"; // then "frames" after a 101, or "raw"
  return (chunk) => {
    if (mode === "raw") {
      emit(chunk);
      return;
    }
    buf = Buffer.concat([buf, chunk]);
    if (mode === "head") {
      const end = buf.indexOf("\r\n\r\n");
      if (end < 0) return;
      mode = buf.subarray(0, 12).toString("latin1") === "HTTP/1.1 101" ? "frames" : "raw";
      if (mode === "raw") {
        emit(buf);
        buf = Buffer.alloc(0);
        return;
      }
      emit(buf.subarray(0, end + 4));
      buf = buf.subarray(end + 4);
    }
    for (;;) {
      if (buf.length < 2) return;
      let len = buf[1] & 0x7f;
      let off = 2;
      if (len === 126) {
        if (buf.length < 4) return;
        len = buf.readUInt16BE(2);
        off = 4;
      } else if (len === 127) {
        if (buf.length < 10) return;
        len = Number(buf.readBigUInt64BE(2));
        off = 10;
      }
      if (buf.length < off + len) return;
      emit(buf.subarray(0, off + len));
      buf = buf.subarray(off + len);
    }
  };
}

/** Whether frame is a text frame holding the ack of a publish (it has a message_id). */
function isPublishAck(frame) {
  if ((frame[0] & 0x0f) !== 1) return false;
  const text = frame.toString("utf8");
  return text.includes('"type":"ack"') && text.includes('"message_id"');
}

// ---- a Redis server of the test's own ----

/** A free loopback TCP port. */
export async function freePort() {
  const srv = net.createServer();
  await new Promise((resolve) => srv.listen(0, "127.0.0.1", resolve));
  const { port } = srv.address();
  await new Promise((resolve) => srv.close(resolve));
  return port;
}

/**
 * Starts redis-server (Debian's; scripts/test-all.sh installs it) on a free
 * loopback port, keeping nothing on disk; stop() ends it.
 */
export async function startRedis() {
  const port = await freePort();
  const proc = track(spawn("redis-server", ["--bind", "127.0.0.1", "--port", String(port), "--save", "", "--appendonly", "no"], {
    stdio: ["ignore", "pipe", "pipe"],
  }));
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("redis-server did not start")), TIMEOUT);
    const lines = createInterface({ input: proc.stdout });
    lines.on("line", (line) => {
      if (/Ready to accept connections/.test(line)) {
        clearTimeout(timer);
        resolve();
      }
    });
    proc.once("exit", (code) => reject(new Error(`redis-server exited (${code})`)));
  });
  return {
    addr: `127.0.0.1:${port}`,
    stop() {
      proc.kill("SIGTERM");
      return new Promise((resolve) => (proc.exitCode !== null ? resolve() : proc.once("exit", resolve)));
    },
  };
}
