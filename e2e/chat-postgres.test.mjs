// The chat on PostgreSQL (pgbroker/examples/chat) in a real browser: the
// server restarts, and since the room's epoch and history live in the
// database, the page recovers exactly what it missed while the server was
// away; it never says "history lost".

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { buildProgram, launchBrowser, openPage, removeBuilds, snap, startProgram, startProxy, uniq } from "./lib/harness.mjs";

let browser;
let postgres;

before(async () => {
  // pgbroker's throwaway server: initdb in a temporary directory, a free
  // loopback port, removed when stopped.
  const server = await buildProgram("pgbroker", "./internal/pgtest/pgtestserver");
  [browser, postgres] = await Promise.all([
    launchBrowser(),
    startProgram(server, [], /postgres ready: (postgres:\/\/\S+)/, "pgtestserver"),
  ]);
});

after(async () => {
  await browser?.close();
  if (postgres) assert.equal(await postgres.stop(), 0, "the PostgreSQL server did not stop cleanly");
  removeBuilds();
});

/** Starts the PostgreSQL chat on a free port, its rooms in schema. */
async function startChat(schema) {
  const bin = await buildProgram("pgbroker", "./examples/chat");
  return startProgram(bin, ["-addr", "127.0.0.1:0", "-postgres", postgres.url, "-schema", schema], /listening on (http:\/\/\S+)/, "chat");
}

/** Opens the chat as nick in room through base; closed when test t ends. */
async function openChat(t, base, nick, room) {
  const page = await openPage(browser, chatURL(base, nick, room));
  t.after(() => page.context().close());
  return joined(page);
}

const chatURL = (base, nick, room) => `${base}/?nick=${encodeURIComponent(nick)}&room=${encodeURIComponent(room)}`;

/** Waits until the page is connected and subscribed: its own entry is in the member list. */
async function joined(page) {
  await page.locator('#status[data-state="open"]').waitFor();
  await page.locator("#members li.you").waitFor();
  return page;
}

async function say(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
}

// A line as the room delivered it: not the page's own "sending: …" line,
// which is there before the server has the message. (Waiting for that
// one, the test stopped the server before ann's message was published
// about once in ten runs; her client then published it, exactly once, to
// the restarted server, after bob's, and the page recovered 3.)
const line = (page, text) => page.locator("#log li:not(.pending)", { hasText: text });

test("the chat on PostgreSQL: a page whose server restarted recovers exactly what it missed", async (t) => {
  // ann reaches the server through a proxy, which keeps her address while
  // the server restarts on another port; bob talks to each life directly.
  const schema = "e2e_" + uniq();
  const room = "e2e-pg-" + uniq();
  const first = await startChat(schema);
  t.after(() => first.stop());
  const proxy = await startProxy(first.port);
  t.after(() => proxy.close());
  // ann's page runs on a clock the test holds while the server is away:
  // her client redials once the new server is there, rather than backing
  // off further with every dial against a server not started yet (the
  // next attempt could then come after the test's wait).
  const ann = await openPage(browser, "about:blank");
  t.after(() => ann.context().close());
  await ann.clock.install();
  await ann.goto(chatURL(proxy.url, "ann", room));
  await joined(ann);
  await say(ann, "before the restart");
  await line(ann, "before the restart").waitFor();

  await ann.clock.pauseAt(Date.now() + 1000);
  assert.equal(await first.stop(), 0, "the first server did not shut down cleanly");
  await ann.locator('#status[data-state="reconnecting"]').waitFor();
  await ann.locator("#status-text", { hasText: "server going away" }).waitFor(); // 1001 from the graceful shutdown

  const second = await startChat(schema);
  t.after(() => second.stop());
  const bob = await openChat(t, second.url, "bob", room);
  const missed = ["said while ann was away", "and once more"];
  for (const text of missed) await say(bob, text);
  await line(bob, "and once more").waitFor();

  proxy.retarget(second.port);
  await ann.clock.resume();
  await ann.locator("#status-text", { hasText: "recovered 2 missed" }).waitFor();
  assert.equal(await ann.locator("#status").getAttribute("data-state"), "open");
  for (const text of missed) await line(ann, text).waitFor();
  assert.equal(await line(ann, "history lost").count(), 0, "the page said history was lost");

  // Live again, and every line once, in order.
  await say(bob, "live after the restart");
  await line(ann, "live after the restart").waitFor();
  const lines = (await ann.locator("#log li.chat, #log li.raw").allTextContents()).map((s) => s.replace(/^.*?(ann|bob): /, ""));
  assert.deepEqual(lines, ["before the restart", ...missed, "live after the restart"]);
  await snap(ann, "chat-postgres-recovered");
  assert.deepEqual(ann.errors, []);
});
