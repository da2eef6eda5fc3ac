// The htmx example in a real browser: htmx 4 and its SSE and WebSocket
// extensions, served by the example from its vendored copies, swap the
// fragments the Go backend publishes. A post reaches every page's feed
// with its total out of band, a chat line sent over the WebSocket reaches
// the other page, a page whose connection was cut gets exactly what it
// missed (htmx's Last-Event-ID), and a page whose server restarted is told
// (+reset) and reloads.

import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { after, before, test } from "node:test";
import {
  e2eDir, launchBrowser, openPage, removeBuilds, repoRoot, snap, startExample, startProxy, uniq,
} from "./lib/harness.mjs";

let browser;
let server;

before(async () => {
  [browser, server] = await Promise.all([launchBrowser(), startExample("htmx")]);
});

after(async () => {
  await browser?.close();
  if (server) assert.equal(await server.stop(), 0, "the htmx server did not shut down cleanly");
  removeBuilds();
});

/** Opens the page at base and waits until its feed stream and its chat WebSocket are live. */
async function open(t, base) {
  const page = await openPage(browser, `${base}/`);
  t.after(() => page.context().close());
  await live(page);
  return page;
}

async function live(page) {
  await page.locator('#feed[data-state="live"]').waitFor();
  await page.locator('section[hx-ws\\:connect][data-state="live"]').waitFor();
}

/** Posts a notification as htmx would, from outside any page. */
async function post(base, text) {
  const res = await fetch(`${base}/notify`, {
    method: "POST",
    headers: { "HX-Request": "true", "Content-Type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({ text }),
  });
  assert.equal(res.status, 200, `POST /notify ${JSON.stringify(text)}: ${await res.text()}`);
}

/** The feed's items, newest first: their ids and texts. */
const feed = (page) => page.evaluate(() => [...document.querySelectorAll("#feed li")].map((li) => ({
  id: li.id,
  text: li.childNodes[li.childNodes.length - 1].textContent.trim(),
})));

test("the vendored htmx files are the pinned npm package's, byte for byte, and the example serves them", async () => {
  const pkg = path.join(e2eDir, "node_modules", "htmx.org");
  const { version } = JSON.parse(await readFile(path.join(pkg, "package.json"), "utf8"));
  const pinned = JSON.parse(await readFile(path.join(e2eDir, "package.json"), "utf8")).devDependencies["htmx.org"];
  assert.equal(version, pinned, "node_modules holds the pinned htmx.org (run npm ci)");
  for (const [vendored, inPackage] of [
    ["htmx.min.js", "dist/htmx.min.js"],
    ["hx-sse.js", "dist/ext/hx-sse.js"],
    ["hx-ws.js", "dist/ext/hx-ws.js"],
    ["LICENSE", "LICENSE"],
  ]) {
    const ours = await readFile(path.join(repoRoot, "examples", "htmx", "static", vendored));
    assert.ok(ours.equals(await readFile(path.join(pkg, inPackage))), `examples/htmx/static/${vendored} differs from htmx.org@${pinned}'s ${inPackage}`);
    const res = await fetch(`${server.url}/static/${vendored}`);
    assert.equal(res.status, 200, `GET /static/${vendored}`);
    assert.ok(Buffer.from(await res.arrayBuffer()).equals(ours), `GET /static/${vendored} serves other bytes`);
  }
});

test("a post from one page reaches both feeds, its total out of band, and markup stays text", async (t) => {
  const ann = await open(t, server.url);
  const bob = await open(t, server.url);
  // "N watching" is published by the server as connections come and go;
  // pages of earlier tests are gone, so both see the two feeds open now.
  for (const page of [ann, bob]) await page.locator("#watching", { hasText: /^2 watching$/ }).waitFor();

  const text = `<b>bold</b> & <script>window.pwned = 1</script> ${uniq()}`;
  await ann.fill("#post-form input[name=text]", text);
  await ann.press("#post-form input[name=text]", "Enter");
  for (const page of [ann, bob]) {
    const item = page.locator("#feed li").first();
    await item.filter({ hasText: text }).waitFor();
    const n = (await item.getAttribute("id")).replace("note-", "");
    assert.equal(await page.locator("#total").textContent(), n, "the total came with the item, out of band");
    assert.equal(await item.locator("b, script").count(), 0, "the markup was escaped");
    assert.equal(await page.evaluate(() => window.pwned), undefined);
  }
  assert.equal(await ann.inputValue("#post-form input[name=text]"), "", "the form came back empty");

  // A refusal comes back as the form with the reason (422, swapped too),
  // the text kept; nothing is published.
  const before = await feed(bob);
  await ann.fill("#post-form input[name=text]", "   ");
  await ann.press("#post-form input[name=text]", "Enter");
  await ann.locator("#post-form .error", { hasText: "Write something first." }).waitFor();
  await ann.fill("#post-form input[name=text]", "after the refusal");
  await ann.press("#post-form input[name=text]", "Enter");
  await bob.locator("#feed li").first().filter({ hasText: "after the refusal" }).waitFor();
  assert.deepEqual((await feed(bob)).slice(1), before, "the refused post published nothing");
  await ann.locator("#post-form .error:empty").waitFor({ state: "attached" }); // hidden when empty

  await snap(bob, "htmx");
  assert.deepEqual(ann.errors, []);
  assert.deepEqual(bob.errors, []);
});

test("a chat line sent over the WebSocket appears on the other page, escaped", async (t) => {
  const ann = await open(t, server.url);
  const bob = await open(t, server.url);
  const line = `hi <img src=x onerror="window.pwned = 1"> ${uniq()}`;
  await ann.locator("section[hx-ws\\:connect] input[name=text]").fill(line);
  await ann.locator("section[hx-ws\\:connect] input[name=text]").press("Enter");
  for (const page of [bob, ann]) {
    await page.locator("#chat-log li", { hasText: line }).waitFor();
    assert.equal(await page.locator("#chat-log img").count(), 0, "the markup was escaped");
  }
  assert.equal(await ann.locator("section[hx-ws\\:connect] input[name=text]").inputValue(), "", "the chat box was cleared");
  assert.equal(await bob.evaluate(() => window.pwned), undefined);
  assert.deepEqual(ann.errors, []);
  assert.deepEqual(bob.errors, []);
});

test("a page whose connection was cut shows every notification it missed, once, in order", async (t) => {
  const proxy = await startProxy(server.port);
  t.after(() => proxy.close());
  await open(t, server.url); // another page, which stays: someone counts the cut page leaving
  const page = await open(t, proxy.url);
  const tag = uniq();
  await post(server.url, `before the cut ${tag}`);
  await page.locator("#feed li").first().filter({ hasText: `before the cut ${tag}` }).waitFor();
  await page.evaluate(() => {
    window.notReloaded = true;
    window.resets = [];
    document.getElementById("feed").addEventListener("+reset", (e) => window.resets.push(JSON.parse(e.detail.data).room));
  });

  proxy.cut();
  await page.locator('#feed[data-state="connecting"]').waitFor(); // htmx noticed, and retries
  const missed = [1, 2, 3].map((i) => `missed ${i} ${tag}`);
  for (const text of missed) await post(server.url, text);
  proxy.restore(); // htmx reconnects by itself, sending Last-Event-ID
  await page.locator('#feed[data-state="live"]').waitFor();
  await post(server.url, `live again ${tag}`);
  await page.locator("#feed li").first().filter({ hasText: `live again ${tag}` }).waitFor();

  const items = await feed(page);
  const ours = items.filter((i) => i.text.endsWith(tag)).map((i) => i.text);
  assert.deepEqual(ours, [`live again ${tag}`, ...missed.toReversed(), `before the cut ${tag}`]);
  assert.equal(new Set(items.map((i) => i.id)).size, items.length, "no notification twice");
  const total = await page.locator("#total").textContent();
  assert.equal(items[0].id, `note-${total}`, "the total is the newest notification's");
  assert.equal(await page.evaluate(() => window.notReloaded), true, "recovered in place: the page did not reload");
  // The watcher count published while it was away is not kept: that room
  // may be reset (and a fresh count follows), never the feed.
  assert.ok((await page.evaluate(() => window.resets)).every((room) => room === "watching"));
  await page.locator("#watching", { hasText: /^2 watching$/ }).waitFor();
  assert.deepEqual(page.errors, []);
});

test("a page whose server restarted is told it cannot recover, and reloads", async (t) => {
  const proxy = await startProxy(server.port);
  t.after(() => proxy.close());
  const page = await open(t, proxy.url);
  const tag = uniq();
  await post(server.url, `first server ${tag}`);
  await page.locator("#feed li").first().filter({ hasText: `first server ${tag}` }).waitFor();
  await page.evaluate(() => { window.notReloaded = true; });

  // Another server, with another life of the feed room: the page's
  // Last-Event-ID names a position it never had (epoch_changed).
  const second = await startExample("htmx");
  t.after(() => second.stop());
  await post(second.url, `second server ${tag}`);
  proxy.retarget(second.port);
  proxy.cut();
  proxy.restore();
  await page.waitForFunction(() => window.notReloaded === undefined); // the +reset reloaded it
  await live(page);
  await page.locator("#feed li").first().filter({ hasText: `second server ${tag}` }).waitFor();
  assert.deepEqual((await feed(page)).map((i) => i.text), [`second server ${tag}`], "the feed is the second server's");
  assert.deepEqual(page.errors, []);
  assert.equal(await second.stop(), 0, "the second server did not shut down cleanly");
});
