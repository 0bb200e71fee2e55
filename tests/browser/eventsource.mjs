// Drive Debian's Chromium headless (playwright-core, no browser download): open
// PAGE_URL, whose own script runs an EventSource, and print what it received
// once it has EXPECTED events (or TIMEOUT_MS passed) as one JSON line.
//
//   node eventsource.mjs PAGE_URL EXPECTED TIMEOUT_MS
import { chromium } from 'playwright-core';

const [url, expected, timeoutMs] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});
let timedOut = false;
try {
  const page = await browser.newPage();
  page.on('console', (msg) => process.stderr.write(`console: ${msg.text()}\n`));
  await page.goto(url);
  try {
    await page.waitForFunction((n) => window.received.length >= n, Number(expected), {
      timeout: Number(timeoutMs),
      polling: 50,
    });
  } catch (err) {
    timedOut = true;
  }
  const result = await page.evaluate(() => ({
    received: window.received,
    resets: window.resets,
    opens: window.opens,
    errors: window.errors,
  }));
  process.stdout.write(JSON.stringify({ ...result, timedOut }) + '\n');
} finally {
  await browser.close();
}
