// The README's docs/demo.png: the real demo page in headless Chromium, after uploading an image.
//
//   apt-get install -y chromium && npm install --prefix /tmp/pw playwright-core
//   .venv/bin/onecycle demo --port 7860 &
//   NODE_PATH=/tmp/pw/node_modules node docs/demo_screenshot.js http://127.0.0.1:7860/ some.png docs/demo.png
//
// Prints the top classes the page shows, and fails if the page requested anything outside this machine.
const { chromium } = require('playwright-core');

(async () => {
  const [url, image, out] = process.argv.slice(2);
  if (!out) {
    console.error('usage: node docs/demo_screenshot.js URL IMAGE OUT.png');
    process.exit(2);
  }
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update'],
  });
  const page = await browser.newPage({ viewport: { width: 1000, height: 700 } });
  const outside = [];
  page.on('request', (r) => {
    const u = new URL(r.url());
    if (['http:', 'https:', 'ws:', 'wss:'].includes(u.protocol) && !['127.0.0.1', 'localhost', '[::1]'].includes(u.hostname)) {
      outside.push(r.url());
    }
  });
  await page.goto(url, { waitUntil: 'networkidle' });
  await page.setInputFiles('#input-image input[type=file]', image);
  await page.waitForSelector('#top-classes [data-testid="label-output-value"]', { timeout: 60000 });
  await page.waitForLoadState('networkidle');
  await page.waitForTimeout(500);
  await page.screenshot({ path: out, fullPage: true });
  console.log((await page.locator('#top-classes').innerText()).split('\n').filter(Boolean).join(' | '));
  await browser.close();
  if (outside.length) {
    console.error('requests outside this machine:', outside);
    process.exit(1);
  }
})();
