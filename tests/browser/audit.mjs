// Lighthouse's accessibility and best-practices scores for each URL given, in one Chrome
// (CHROME_PATH): `node audit.mjs '<headers JSON>' URL...` prints {url: {category: score}} as JSON,
// with the failed audits' ids, for tests/test_console_design.py.
import * as chromeLauncher from "chrome-launcher";
import lighthouse from "lighthouse";

const [headers, ...urls] = process.argv.slice(2);
const chrome = await chromeLauncher.launch({
  chromeFlags: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update"],
});
const results = {};
try {
  for (const url of urls) {
    const run = await lighthouse(url, {
      port: chrome.port, output: "json", logLevel: "error", extraHeaders: JSON.parse(headers),
      onlyCategories: ["accessibility", "best-practices"], formFactor: "desktop",
      maxWaitForLoad: 15000,  // the console keeps an event stream open: never "network idle"
      screenEmulation: {mobile: false, width: 1366, height: 900, deviceScaleFactor: 1, disabled: false},
    });
    const {categories, audits} = run.lhr;
    results[url] = {
      scores: Object.fromEntries(Object.entries(categories).map(([id, c]) => [id, c.score])),
      failed: Object.values(audits)
        .filter((a) => a.scoreDisplayMode === "binary" && a.score === 0).map((a) => a.id),
    };
  }
} finally {
  await chrome.kill();
}
console.log(JSON.stringify(results));
