// bench/pageload.mjs CONFIG.json: page loads in Debian's Chromium over an emulated link.
//
// Driven by bench/pageload.py, which starts MLflow and the contenders and writes
// CONFIG.json: { contenders: [{name, base}], pages: [{name, path, selector, text?, attr?}],
// links: [{name, latency_ms, down_mbit, up_mbit}], reps, timeout_ms, quiet_ms, settle_max_ms,
// out (JSON lines, one per measurement) }.
//
// One measurement pair per (rep, link, page, contender), contenders rotated per rep:
//   cold: a fresh Chromium profile opens the page's URL (as a bookmark would);
//   warm: the same profile, Chromium closed and started again (HTTP disk cache kept,
//         no open connections, no memory cache: a user coming back later).
// The link is Chrome DevTools Protocol network emulation
// (Network.emulateNetworkConditions: latency per request, down/up throughput),
// set before the navigation. The time is performance.now() (from navigation start)
// at which the page's element first matched, seen by a MutationObserver installed
// before any page script runs: no fixed sleeps. Bytes are CDP's encodedDataLength
// (what went over the wire, headers included) of every request, counted when the
// element appeared and (cold loads) again once the network was quiet.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(path.join(ROOT, 'testenv', 'browser', 'package.json'));
const CHROMIUM = process.env.FLOWGATE_CHROMIUM || '/usr/bin/chromium';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Runs in the page before its scripts: records when the element first matches.
function readyWatcher({ selector, text, attr }) {
  const match = () => {
    for (const el of document.querySelectorAll(selector)) {
      if (text && !(el.textContent || '').includes(text)) continue;
      if (attr && (el.getAttribute(attr) || '').length < 8) continue;
      return true;
    }
    return false;
  };
  const hit = () => {
    if (window.__fgReady !== undefined) return;
    if (document.documentElement && match()) {
      window.__fgReady = performance.now();
      obs.disconnect();
      clearInterval(timer);
    }
  };
  const obs = new MutationObserver(hit);
  obs.observe(document, { childList: true, subtree: true, attributes: true, characterData: true });
  const timer = setInterval(hit, 50);
}

async function launch(chromium, dir) {
  return chromium.launchPersistentContext(dir, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1400, height: 900 },
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-sync',
      '--disable-background-networking', '--disable-component-update',
      // loopback only: MLflow's UI links a video on mlflow.org from some pages
      '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1',
    ],
  });
}

/** One page load; returns the measurement (ready_ms null if the element never appeared). */
async function load(chromium, dir, url, link, pg, cfg, settleMaxMs) {
  const ctx = await launch(chromium, dir);
  try {
    await ctx.addInitScript(readyWatcher, { selector: pg.selector, text: pg.text || null, attr: pg.attr || null });
    const page = ctx.pages()[0] || (await ctx.newPage());
    const cdp = await ctx.newCDPSession(page);
    const reqs = new Map();
    let lastActivity = Date.now();
    const entry = (id) => {
      if (!reqs.has(id)) reqs.set(id, { url: '', status: null, bytes: 0, done: false, cache: null, enc: null, cc: null, etag: null });
      lastActivity = Date.now();
      return reqs.get(id);
    };
    cdp.on('Network.requestWillBeSent', (e) => {
      if (e.request.url.startsWith('data:')) return;
      const r = entry(e.requestId);
      r.url = e.request.url;
    });
    cdp.on('Network.requestServedFromCache', (e) => { if (reqs.has(e.requestId)) entry(e.requestId).cache = 'memory'; });
    cdp.on('Network.responseReceived', (e) => {
      if (!reqs.has(e.requestId)) return;
      const r = entry(e.requestId);
      const h = Object.fromEntries(Object.entries(e.response.headers || {}).map(([k, v]) => [k.toLowerCase(), v]));
      r.status = e.response.status;
      if (e.response.fromDiskCache) r.cache = 'disk';
      r.enc = h['content-encoding'] || null;
      r.cc = h['cache-control'] || null;
      r.etag = h.etag || null;
      r.lm = h['last-modified'] || null;
    });
    cdp.on('Network.loadingFinished', (e) => {
      if (!reqs.has(e.requestId)) return;
      const r = entry(e.requestId);
      r.bytes = e.encodedDataLength || 0;
      r.done = true;
    });
    cdp.on('Network.loadingFailed', (e) => {
      if (!reqs.has(e.requestId)) return;
      const r = entry(e.requestId);
      r.failed = e.errorText || 'failed';
      r.done = true;
    });
    await cdp.send('Network.enable');
    await cdp.send('Network.emulateNetworkConditions', {
      offline: false,
      latency: link.latency_ms,
      downloadThroughput: (link.down_mbit * 1e6) / 8,
      uploadThroughput: (link.up_mbit * 1e6) / 8,
    });

    const started = Date.now();
    let error = null;
    let readyMs = null;
    try {
      await page.goto(url, { waitUntil: 'commit', timeout: cfg.timeout_ms });
      const left = Math.max(1000, cfg.timeout_ms - (Date.now() - started));
      await page.waitForFunction(() => window.__fgReady !== undefined, null, { timeout: left, polling: 100 });
      readyMs = await page.evaluate(() => window.__fgReady);
    } catch (e) {
      error = e.message.split('\n')[0];
    }
    const snap = () => {
      const all = [...reqs.values()];
      return {
        requests: all.length,
        bytes: all.reduce((s, r) => s + r.bytes, 0),
        from_cache: all.filter((r) => r.cache).length,
        not_modified: all.filter((r) => r.status === 304).length,
      };
    };
    const atReady = snap();
    // Let the page finish (so the cold run leaves a complete cache behind):
    // quiet means nothing in flight and no new request for quiet_ms.
    const settleStart = Date.now();
    while (Date.now() - settleStart < settleMaxMs) {
      // a web worker's script finishes in the worker's own target, never in this one
      const busy = [...reqs.values()].some((r) => !r.done && !/\.worker\.js$/.test(r.url));
      if (!busy && Date.now() - lastActivity >= cfg.quiet_ms) break;
      await sleep(100);
    }
    const all = [...reqs.values()];
    const largest = all.filter((r) => r.status === 200 && !r.cache).sort((a, b) => b.bytes - a.bytes)[0] || null;
    const errors = all.filter((r) => r.failed || (r.status && r.status >= 400))
      .map((r) => `${r.status ?? r.failed} ${new URL(r.url).pathname}`);
    const pending = all.filter((r) => !r.done).map((r) => r.url);
    const doc = all[0];
    const staticAll = all.filter((r) => /\/static-files\//.test(r.url));
    return {
      ready_ms: readyMs,
      wall_ms: Date.now() - started,
      error,
      at_ready: atReady,
      total: snap(),
      settled: pending.length === 0,
      pending,
      errors,
      largest: largest && {
        path: new URL(largest.url).pathname, bytes: largest.bytes, encoding: largest.enc,
        cache_control: largest.cc, etag: largest.etag, last_modified: largest.lm,
      },
      document: doc && {
        status: doc.status, bytes: doc.bytes, cache: doc.cache, encoding: doc.enc,
        cache_control: doc.cc, etag: doc.etag, last_modified: doc.lm,
      },
      static: {
        requests: staticAll.length,
        from_cache: staticAll.filter((r) => r.cache).length,
        not_modified: staticAll.filter((r) => r.status === 304).length,
        encodings: [...new Set(staticAll.filter((r) => !r.cache && r.status === 200).map((r) => r.enc || 'identity'))].sort(),
      },
    };
  } finally {
    await ctx.close().catch(() => {});
  }
}

async function main() {
  const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const { chromium } = require('playwright-core');
  if (!fs.existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} not found (apt-get install chromium)`);
  const out = fs.openSync(cfg.out, 'a');
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'flowgate-pageload-'));
  let n = 0;
  try {
    for (let rep = 0; rep < cfg.reps; rep++) {
      for (const link of cfg.links) {
        for (const pg of cfg.pages) {
          const k = rep % cfg.contenders.length;
          const order = cfg.contenders.slice(k).concat(cfg.contenders.slice(0, k));
          for (const c of order) {
            const dir = path.join(tmp, `p${n++}`);
            const url = c.base + pg.path;
            for (const cache of cfg.caches) {
              // the cold load settles so that the warm one finds a complete cache
              const m = await load(chromium, dir, url, link, pg, cfg, cache === 'cold' ? cfg.settle_max_ms : 0);
              const row = { rep, link: link.name, page: pg.name, contender: c.name, cache, ...m };
              fs.writeSync(out, JSON.stringify(row) + '\n');
              console.error(`pageload: ${link.name.padEnd(14)} ${pg.name.padEnd(5)} ${cache.padEnd(4)} ${c.name.padEnd(7)} rep${rep}: `
                + (m.ready_ms != null ? `${Math.round(m.ready_ms)} ms` : `NOT SHOWN (${m.error})`)
                + `, ${(m.at_ready.bytes / 1024).toFixed(0)} KiB in ${m.at_ready.requests} requests`
                + ` (settled: ${(m.total.bytes / 1024).toFixed(0)} KiB, ${m.total.requests})`);
            }
            fs.rmSync(dir, { recursive: true, force: true });
          }
        }
      }
    }
  } finally {
    fs.closeSync(out);
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
