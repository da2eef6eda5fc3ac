// Raw-mode interop: wscat (no client library, no subprotocol) and the
// chat page in the same room, both ways.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { launchBrowser, openPage, removeBuilds, runWscat, snap, startExample } from "./lib/harness.mjs";

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

/** Opens the chat as nick in the lobby; the page is closed when test t ends. */
async function openLobby(t, nick) {
  const page = await openPage(browser, `${server.url}/?nick=${nick}&room=lobby`);
  t.after(() => page.context().close());
  await page.locator('#status[data-state="open"]').waitFor();
  await page.locator("#members li.you").waitFor(); // subscribed
  return page;
}

const wsLobby = () => `${server.url.replace(/^http/, "ws")}/ws?room=lobby`;

test("a line sent with wscat -x appears on a page in the room", async (t) => {
  const ann = await openLobby(t, "ann");
  // Exactly the README's one-liner; stdin stays open (a pipe) until it is done.
  const wscat = runWscat(["-c", wsLobby(), "-x", "hello from wscat", "-w", "1"]);
  t.after(() => wscat.stop());

  const li = ann.locator("#log li.raw", { hasText: "hello from wscat" });
  await li.waitFor();
  assert.equal(await li.locator(".nick").count(), 0, "a raw line has no nickname");
  assert.equal(await wscat.exited, 0, `wscat failed:\n${wscat.stderr}`);
  // wscat was a member while connected, an anonymous one.
  await ann.locator("#log li", { hasText: "anonymous joined" }).waitFor();
  await ann.locator("#log li", { hasText: "anonymous left" }).waitFor();
  assert.deepEqual(ann.errors, []);
});

test("a page's message reaches a wscat listener, and its typed lines reach the page", async (t) => {
  const ann = await openLobby(t, "ann");
  const wscat = runWscat(["-c", wsLobby()]);
  t.after(() => wscat.stop());
  // Without a terminal wscat prints only what it receives, so the page
  // tells when it is in the room: a nameless member appears.
  await ann.locator("#members li", { hasText: "anonymous" }).waitFor();

  await ann.fill("#text", "hi wscat, from the page");
  await ann.press("#text", "Enter");
  // The page publishes JSON; a raw client gets those bytes verbatim.
  await wscat.waitFor('{"nick":"ann","text":"hi wscat, from the page"}');

  wscat.type("typed in a terminal");
  await ann.locator("#log li.raw", { hasText: "typed in a terminal" }).waitFor();
  await snap(ann, "chat-wscat");

  await wscat.stop();
  await ann.locator("#members li", { hasText: "anonymous" }).waitFor({ state: "detached" });
  assert.deepEqual(ann.errors, []);
});

test("the tutorial's first step, wscat with no room, chats in the lobby", async (t) => {
  const ann = await openLobby(t, "ann");
  // No ?room=: the chat gives raw clients the lobby (WithDefaultRoom).
  const wscat = runWscat(["-c", `${server.url.replace(/^http/, "ws")}/ws`, "-x", "hello from the tutorial", "-w", "1"]);
  t.after(() => wscat.stop());
  await ann.locator("#log li.raw", { hasText: "hello from the tutorial" }).waitFor();
  assert.equal(await wscat.exited, 0, `wscat failed:\n${wscat.stderr}`);
  assert.deepEqual(ann.errors, []);
});
