// The chat example in a real browser: two people chatting, the member
// list, and what a page does when its connection drops (recovery) or when
// the server lost the room (history reload).

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { buildExample, launchBrowser, openPage, removeBuilds, snap, startExample, startProxy, uniq } from "./lib/harness.mjs";

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

/**
 * Opens the chat as nick in room (both through the URL), through base (the
 * server or a proxy); the page is closed when test t ends.
 */
async function openChat(t, base, nick, room) {
  const page = await openPage(browser, `${base}/?nick=${encodeURIComponent(nick)}&room=${encodeURIComponent(room)}`);
  t.after(() => page.context().close());
  await joined(page);
  return page;
}

/** Waits until the page is connected and subscribed: its own entry is in the member list. */
async function joined(page) {
  await page.locator('#status[data-state="open"]').waitFor();
  await page.locator("#members li.you").waitFor();
}

async function say(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
}

// A line of the log; not a message of one's own still being sent ("sending: …").
const line = (page, text) => page.locator("#log li:not(.pending)", { hasText: text });

/** The texts of the chat lines in the log, in order. */
const chatLines = (page) => page.locator("#log li.chat, #log li.raw").allTextContents();

test("two pages chat: both see both messages, with nicknames", async (t) => {
  const room = "e2e-chat-" + uniq();
  const ann = await openChat(t, server.url, "ann", room);
  const bob = await openChat(t, server.url, "bob", room);

  await say(ann, "hello from ann");
  await say(bob, "hello from bob");
  for (const page of [ann, bob]) {
    for (const [nick, text] of [["ann", "hello from ann"], ["bob", "hello from bob"]]) {
      const li = line(page, text);
      await li.waitFor();
      assert.equal(await li.locator(".nick").textContent(), `${nick}: `);
    }
  }
  // Markup in a message is text, never parsed.
  await say(bob, '<img src=x onerror="document.title=1">sneaky');
  await line(ann, "sneaky").waitFor();
  assert.equal(await ann.locator("#log img").count(), 0);
  assert.match(await line(ann, "sneaky").textContent(), /<img src=x onerror="document.title=1">sneaky/);

  // History: a third page joining later sees what was said.
  const cat = await openChat(t, server.url, "cat", room);
  await line(cat, "hello from ann").waitFor();
  await line(cat, "hello from bob").waitFor();
  await snap(ann, "chat-two-pages");
  for (const page of [ann, bob, cat]) assert.deepEqual(page.errors, []);
});

test("a page sees another page join and leave in the member list", async (t) => {
  const room = "e2e-members-" + uniq();
  const ann = await openChat(t, server.url, "ann", room);
  assert.deepEqual(await ann.locator("#members li").allTextContents(), ["ann (you)"]);

  const bob = await openChat(t, server.url, "bob", room);
  await ann.locator("#members li", { hasText: "bob" }).waitFor();
  await line(ann, "bob joined").waitFor();
  assert.equal(await ann.locator("#member-count").textContent(), "(2)");
  // bob sees both too, from the presence list he got on joining.
  await bob.locator("#members li", { hasText: "ann" }).waitFor();

  await bob.context().close(); // the tab goes away
  await ann.locator("#members li", { hasText: "bob" }).waitFor({ state: "detached" });
  await line(ann, "bob left").waitFor();
  assert.equal(await ann.locator("#member-count").textContent(), "(1)");
  assert.deepEqual(ann.errors, []);
});

test("a page switches rooms and changes its nickname", async (t) => {
  const home = "e2e-home-" + uniq();
  const other = "e2e-other-" + uniq();
  const ann = await openChat(t, server.url, "ann", home);
  const bob = await openChat(t, server.url, "bob", other);
  await say(bob, "only in the other room");

  // A custom room, from the form: it joins the list and becomes current.
  await ann.fill("#new-room-name", other);
  await ann.press("#new-room-name", "Enter");
  await ann.locator(`#rooms button[data-room="${other}"][aria-current="true"]`).waitFor();
  assert.equal(await ann.locator(`#rooms button[data-room="${home}"]`).getAttribute("aria-current"), "false");
  await line(ann, "only in the other room").waitFor(); // the room's history
  await ann.locator("#members li", { hasText: "bob" }).waitFor();
  await bob.locator("#members li", { hasText: "ann" }).waitFor();
  assert.equal(new URL(ann.url()).searchParams.get("room"), other);

  // A new nickname shows in the others' member list and on new messages.
  await ann.fill("#nick", "anna");
  await ann.press("#nick", "Enter");
  await bob.locator("#members li", { hasText: "anna" }).waitFor();
  await bob.locator("#members li", { hasText: /^ann$/ }).waitFor({ state: "detached" });
  await say(ann, "new name, same person");
  assert.equal(await line(bob, "new name, same person").locator(".nick").textContent(), "anna: ");

  // Back home: ann leaves the other room, and no longer hears it.
  await ann.locator(`#rooms button[data-room="${home}"]`).click();
  await bob.locator("#members li", { hasText: "anna" }).waitFor({ state: "detached" });
  await say(bob, "anna is gone");
  await line(bob, "anna is gone").waitFor();
  await say(ann, "home again");
  // ann's own line comes after bob's would have, on the same connection.
  await line(ann, "home again").waitFor();
  assert.equal(await line(ann, "anna is gone").count(), 0);
  for (const page of [ann, bob]) assert.deepEqual(page.errors, []);
});

test("a page whose connection drops reconnects and recovers exactly the messages it missed", async (t) => {
  // ann reaches the server through a proxy that can cut the line: to her
  // browser it is a network failure, while the server (and the room's
  // history) lives on. bob talks to the server directly.
  const proxy = await startProxy(server.port);
  t.after(() => proxy.close());
  const room = "e2e-recover-" + uniq();
  const ann = await openChat(t, proxy.url, "ann", room);
  const bob = await openChat(t, server.url, "bob", room);
  await say(bob, "before the cut");
  await line(ann, "before the cut").waitFor();

  proxy.cut();
  await ann.locator('#status[data-state="reconnecting"]').waitFor();
  await ann.locator("#status-text", { hasText: /reconnecting · attempt \d+ in \d+\.\ds/ }).waitFor();
  await line(ann, "connection lost").waitFor();

  const missed = ["missed one", "missed two", "missed three"];
  for (const text of missed) await say(bob, text);
  await line(bob, "missed three").waitFor();
  assert.equal(await line(ann, "missed").count(), 0, "ann got messages while cut off");

  proxy.restore();
  await ann.locator("#status-text", { hasText: "recovered 3 missed" }).waitFor();
  assert.equal(await ann.locator("#status").getAttribute("data-state"), "open");
  for (const text of missed) await line(ann, text).waitFor();

  // Each exactly once, in order, after what came before the cut.
  const lines = (await chatLines(ann)).map((s) => s.replace(/^.*?bob: /, ""));
  assert.deepEqual(lines, ["before the cut", ...missed]);

  // And the page is live again, both ways.
  await say(ann, "back again");
  await line(bob, "back again").waitFor();
  await snap(ann, "chat-recovered");
  assert.deepEqual(ann.errors, []);
});

test("a page whose server restarted (history lost) says so and reloads the room", async (t) => {
  // A server of its own, restarted: the new one never saw the room, so the
  // client cannot recover (epoch_changed) and the page reloads the room
  // over HTTP instead. The proxy keeps ann's address the same.
  const first = await startExample("chat");
  t.after(() => first.stop());
  const proxy = await startProxy(first.port);
  t.after(() => proxy.close());
  const room = "e2e-lost-" + uniq();
  const ann = await openChat(t, proxy.url, "ann", room);
  await say(ann, "before the restart");
  await line(ann, "before the restart").waitFor();

  assert.equal(await first.stop(), 0, "the first server did not shut down cleanly");
  await ann.locator('#status[data-state="reconnecting"]').waitFor();
  await ann.locator("#status-text", { hasText: "server going away" }).waitFor(); // 1001 from the graceful shutdown

  const second = await startExample("chat");
  t.after(() => second.stop());
  // Said on the new server while ann is still away: only the reload can
  // bring it to her, since recovery is impossible.
  const bob = await openChat(t, second.url, "bob", room);
  await say(bob, "said while ann was away");
  await line(bob, "said while ann was away").waitFor();

  proxy.retarget(second.port);
  await ann.locator("#status-text", { hasText: "history lost, reloaded" }).waitFor();
  assert.equal(await ann.locator("#status").getAttribute("data-recovery"), "lost");
  await line(ann, "history lost (epoch_changed)").waitFor();
  await line(ann, "said while ann was away").waitFor();

  // Live again: a new message arrives once, after the reloaded one.
  await say(bob, "live after the reload");
  await line(ann, "live after the reload").waitFor();
  const lines = (await chatLines(ann)).map((s) => s.replace(/^.*?(ann|bob): /, ""));
  assert.deepEqual(lines, ["before the restart", "said while ann was away", "live after the reload"]);
  await ann.locator("#members li", { hasText: "bob" }).waitFor();
  await snap(ann, "chat-history-lost");
  assert.deepEqual(ann.errors, []);
});

/** The room's kept messages, from the chat's GET /api/history. */
async function history(room) {
  const resp = await fetch(`${server.url}/api/history?room=${encodeURIComponent(room)}&limit=100`);
  assert.equal(resp.status, 200);
  return (await resp.json()).messages;
}

const copies = (msgs, text) => msgs.filter((m) => m.data?.text === text).length;

test("a message whose ack is lost, twice, appears exactly once", async (t) => {
  // The proxy cuts ann's connection right after the server took her
  // message, before its ack reaches her, and does it again during the
  // resend. Her client sends it a third time, with the same key: the
  // server recognises it, and everyone sees it once.
  const proxy = await startProxy(server.port);
  t.after(() => proxy.close());
  const room = "e2e-once-" + uniq();
  const ann = await openChat(t, proxy.url, "ann", room);
  const bob = await openChat(t, server.url, "bob", room);
  proxy.dropAcks(2);
  await say(ann, "exactly once");
  await line(bob, "exactly once").waitFor();
  await ann.locator("#log li.pending").waitFor({ state: "detached" }); // her publish resolved
  assert.equal(proxy.acksToDrop, 0, "both acks were dropped on the way");
  assert.equal(copies(await history(room), "exactly once"), 1);
  await say(bob, "after it");
  await line(ann, "after it").waitFor();
  for (const page of [ann, bob]) assert.equal(await line(page, "exactly once").count(), 1);
  assert.deepEqual(ann.errors, []);
});

test("a message typed during a network blip is sent once when the connection is back", async (t) => {
  const proxy = await startProxy(server.port);
  t.after(() => proxy.close());
  const room = "e2e-blip-" + uniq();
  const ann = await openChat(t, proxy.url, "ann", room);
  const bob = await openChat(t, server.url, "bob", room);
  proxy.cut();
  await ann.locator('#status[data-state="reconnecting"]').waitFor();
  await say(ann, "typed while offline");
  await ann.locator("#log li.pending", { hasText: "typed while offline" }).waitFor();
  assert.equal(copies(await history(room), "typed while offline"), 0, "sent while cut off");
  proxy.restore();
  await line(bob, "typed while offline").waitFor();
  await ann.locator("#log li.pending").waitFor({ state: "detached" });
  await say(bob, "after it");
  await line(ann, "after it").waitFor();
  assert.equal(copies(await history(room), "typed while offline"), 1);
  for (const page of [ann, bob]) assert.equal(await line(page, "typed while offline").count(), 1);
  assert.deepEqual(ann.errors, []);
});

test("publish resolves with the positions subscribers saw, in order, across lost acks", async (t) => {
  const proxy = await startProxy(server.port);
  t.after(() => proxy.close());
  const room = "e2e-positions-" + uniq();
  const ann = await openChat(t, proxy.url, "ann", room);
  // A second client in ann's page publishes five messages in a row while
  // every other ack is lost on the way back.
  proxy.dropAcks(1);
  const results = await ann.evaluate(async (room) => {
    const { connect } = await import("/ws/roomcast.js");
    const c = connect("/ws", { minDelay: 20, maxDelay: 100 });
    const out = [];
    for (let i = 0; i < 5; i++) out.push(await c.publish(room, { nick: "script", text: `n${i}` }));
    c.close();
    return out;
  }, room);
  assert.ok(results.some((r) => r.duplicate), "an ack was lost and the resend recognised");
  const kept = (await history(room)).filter((m) => m.data?.nick === "script");
  assert.deepEqual(kept.map((m) => m.data.text), ["n0", "n1", "n2", "n3", "n4"], "once each, in order");
  assert.deepEqual(results.map((r) => r.seq), kept.map((m) => m.seq));
  assert.deepEqual(results.map((r) => r.messageId), kept.map((m) => m.id));
});
