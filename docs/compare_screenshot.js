// The README's docs/tune_compare.png: MLflow's Compare view of a study's trial runs in headless Chromium, the
// parallel coordinates of the schedule's knobs against the tuned metric (the trial runs' `objective`).
//
//   apt-get install -y chromium && npm install --prefix /tmp/pw playwright-core
//   mlflow ui --port 5077 &          # in the folder of a store that holds a study (onecycle tune)
//   NODE_PATH=/tmp/pw/node_modules node docs/compare_screenshot.js 'http://127.0.0.1:5077/#/compare-runs?runs=[...]&experiments=[...]' docs/tune_compare.png
const { chromium } = require('playwright-core');

(async () => {
  const [url, out] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
  });
  const page = await browser.newPage({ viewport: { width: 1200, height: 760 } });
  await page.goto(url, { waitUntil: 'load', timeout: 90000 });
  await page.getByText('Parallel Coordinates Plot').waitFor({ timeout: 90000 });
  await page.waitForTimeout(3000);
  // the metric: replace the default (the first metric) with the study's objective
  const metrics = page.locator('text=Metrics:').locator('xpath=following::div[contains(@class, "select")][1]');
  await metrics.click();
  await page.keyboard.press('Backspace');
  await page.keyboard.type('objective');
  await page.keyboard.press('Enter');
  await page.keyboard.press('Escape');
  await page.waitForTimeout(1500);
  const assistant = page.getByRole('button', { name: /close/i }).last();  // the side panel, if open
  if (await assistant.count()) await assistant.click().catch(() => {});
  await page.waitForTimeout(800);
  await page.screenshot({ path: out, clip: { x: 0, y: 0, width: 1200, height: 600 } });
  await browser.close();
})();
