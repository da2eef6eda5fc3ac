// The ticker example in a real browser: the table fills in and keeps
// changing as the server's feed publishes.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { launchBrowser, openPage, removeBuilds, snap, startExample, TIMEOUT } from "./lib/harness.mjs";

let browser;
let server;

before(async () => {
  [browser, server] = await Promise.all([launchBrowser(), startExample("ticker")]);
});

after(async () => {
  await browser?.close();
  if (server) assert.equal(await server.stop(), 0, "the ticker server did not shut down cleanly");
  removeBuilds();
});

/** Every row's price and last update time, by symbol. */
function snapshot(page) {
  return page.evaluate(() => Object.fromEntries([...document.querySelectorAll("#quotes tr[data-symbol]")].map((tr) => [
    tr.dataset.symbol,
    { price: tr.querySelector(".price").textContent, time: Number(tr.querySelector(".updated").dataset.time ?? 0) },
  ])));
}

test("the ticker page shows every symbol and its values change over time", async (t) => {
  const page = await openPage(browser, server.url + "/");
  t.after(() => page.context().close());
  await page.locator('#status[data-state="open"]').waitFor();

  const symbols = await (await fetch(server.url + "/api/symbols")).json();
  assert.ok(symbols.length >= 4, "the feed has a handful of symbols");
  // Every row gets a price at once (the room keeps its last one) or soon.
  for (const { symbol } of symbols) {
    await page.locator(`#quotes tr[data-symbol="${symbol}"] .price:not(.waiting)`).waitFor();
  }
  const first = await snapshot(page);
  assert.deepEqual(Object.keys(first), symbols.map((s) => s.symbol), "one row per symbol, in the feed's order");
  for (const [symbol, { price }] of Object.entries(first)) {
    assert.match(price, /^\d{1,3}(,\d{3})*\.\d{2,4}$/, `${symbol}'s price`);
  }

  // Over time every symbol is updated again, and prices move: wait until
  // each row has a newer update than the first snapshot, and some price
  // differs from it.
  await page.waitForFunction((before) => {
    const rows = [...document.querySelectorAll("#quotes tr[data-symbol]")];
    const newer = rows.every((tr) => Number(tr.querySelector(".updated").dataset.time) > before[tr.dataset.symbol].time);
    const moved = rows.some((tr) => tr.querySelector(".price").textContent !== before[tr.dataset.symbol].price);
    return newer && moved;
  }, first, { timeout: TIMEOUT });

  // A change flashes its price (up or down).
  await page.locator("#quotes .price.up, #quotes .price.down").first().waitFor();
  assert.ok(Number(await page.locator("#total").textContent()) > symbols.length);
  await snap(page, "ticker");
  assert.deepEqual(page.errors, []);
});
