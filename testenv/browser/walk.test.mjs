// A user's walk through real MLflow behind the real flowgate-adapter, in Debian's
// headless Chromium, for each pinned MLflow version.
//
//   cd testenv/browser && npm ci && node --test --test-concurrency=1 walk.test.mjs
//
// Env:
//   FLOWGATE_ADAPTER_BIN    adapter binary (default <repo>/target/debug/flowgate-adapter)
//   FLOWGATE_WALK_VERSIONS  comma list of MLflow venv names (default "current,1.9.1");
//                           NAME:sqlite walks a store in SQLite (mlflow.db + artifacts/)
//                           instead of a file store (mlruns/), e.g. current:sqlite
//   FLOWGATE_WALK_DIRECT=1  no adapter: walk MLflow itself at http://127.0.0.1:<port>/
//   FLOWGATE_WALK_PREFIX    instance path (default /k3x9q2a)
//   FLOWGATE_SCREENSHOTS    where screenshots go (default <repo>/target/screenshots)
//   FLOWGATE_KEEP_TMP=1     keep the temp dir (store, logs, browser profile)
//   FLOWGATE_WALK_URL       walk an instance that runs already (a pod behind an Ingress):
//                           http://mlflow.example.test:PORT/<id>/ (Chromium resolves that
//                           host to 127.0.0.1); starts no MLflow and no adapter; needs
//                           FLOWGATE_WALK_SUMMARY, populate.py's JSON for the instance's
//                           store (still on disk: the artifacts are compared byte for byte);
//                           a `link` instance's access URL (with its query) signs in first
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { after, before, describe, it } from 'node:test';

import {
  PUBLIC_HOST, ROOT, freePort, launchChromium, log, mkTemp, populate, recordRequests, request as rawRequest,
  sha256, startAdapter, startMlflow, tail, venv,
} from './lib.mjs';

// A `link` instance's session cookie (FLOWGATE_WALK_URL with its access link):
// the tests' own requests carry it, as the signed-in browser's do.
let sessionCookie = null;
function request(opts) {
  if (!sessionCookie) return rawRequest(opts);
  return rawRequest({ ...opts, headers: { Cookie: sessionCookie, ...(opts.headers || {}) } });
}

const VERSIONS = (process.env.FLOWGATE_WALK_VERSIONS || 'current,1.9.1').split(',').map((s) => s.trim()).filter(Boolean);
const DIRECT = process.env.FLOWGATE_WALK_DIRECT === '1';
const TARGET = process.env.FLOWGATE_WALK_URL ? new URL(process.env.FLOWGATE_WALK_URL) : null;
const PREFIX = TARGET ? TARGET.pathname.replace(/\/+$/, '') : (process.env.FLOWGATE_WALK_PREFIX || '/k3x9q2a');
const SHOTS = process.env.FLOWGATE_SCREENSHOTS || path.join(ROOT, 'target', 'screenshots');
const STEP_TIMEOUT = 20000;

// Requests that MLflow itself answers with an error during the walk, also without any
// proxy; each is tolerated only with exactly this method, path (relative to the
// instance root) and status.
const TOLERATED = {
  current: [
    // no auth app configured: the UI asks who is logged in and gets 404
    { method: 'GET', path: /^ajax-api\/2\.0\/mlflow\/users\/current$/, status: 404 },
  ],
  '1.9.1': [
    // the model registry needs a database store; on a file store 1.9.1 answers 400
    { method: 'GET', path: /^ajax-api\/2\.0\/preview\/mlflow\/model-versions\/search\?/, status: 400 },
    { method: 'GET', path: /^ajax-api\/2\.0\/preview\/mlflow\/registered-models\/list$/, status: 400 },
  ],
};

// What the UI shows for demo-run-1's final accuracy (0.9375): 1.9.1 rounds to 3 digits.
const ACCURACY_SHOWN = { current: '0.9375', '1.9.1': '0.938' };

fs.mkdirSync(SHOTS, { recursive: true });

async function setUp(version, sqlite, env) {
  const t0 = Date.now();
  env.tmp = mkTemp(`flowgate-walk-${version}-`);
  if (TARGET) {
    // A running instance: only Chromium's host mapping and the store's summary.
    assert.equal(TARGET.hostname, PUBLIC_HOST, `FLOWGATE_WALK_URL's host must be ${PUBLIC_HOST} (Chromium maps it to 127.0.0.1)`);
    assert.ok(process.env.FLOWGATE_WALK_SUMMARY, 'FLOWGATE_WALK_URL needs FLOWGATE_WALK_SUMMARY (populate.py output)');
    env.summary = JSON.parse(fs.readFileSync(process.env.FLOWGATE_WALK_SUMMARY, 'utf8'));
    env.port = Number(TARGET.port || 80);
    env.host = TARGET.host;
    env.root = `${PREFIX}/`;
    env.base = `http://${env.host}${env.root}`;
    if (TARGET.search) {
      const r = await rawRequest({ port: env.port, path: TARGET.pathname + TARGET.search, headers: { Host: env.host } });
      assert.equal(r.status, 303, `the access link should sign in with a 303, got ${r.status}`);
      sessionCookie = [].concat(r.headers['set-cookie'] || [])[0]?.split(';')[0] || null;
      assert.ok(sessionCookie, 'the access link set no cookie');
    }
    log(`${version}: walking the running instance ${env.base} (mlflow ${env.summary.mlflow_version})`);
    return;
  }
  env.venv = venv(version);
  env.store = path.join(env.tmp, sqlite ? 'store' : 'mlruns');
  env.summary = populate(env.venv, env.store, { sqlite });
  env.mlflowPort = await freePort();
  env.mlflow = await startMlflow(version, env.store, env.mlflowPort, path.join(env.tmp, 'mlflow.log'));
  if (DIRECT) {
    env.port = env.mlflowPort;
    env.host = `127.0.0.1:${env.port}`;
    env.root = '/';
  } else {
    env.port = await freePort();
    // read-only (the default: no --writes), answering only for the public host
    env.adapter = await startAdapter({
      port: env.port, upstreamPort: env.mlflowPort, prefix: PREFIX, logFile: path.join(env.tmp, 'adapter.log'),
      extraArgs: ['--public-host', PUBLIC_HOST],
    });
    env.host = `${PUBLIC_HOST}:${env.port}`;
    env.root = `${PREFIX}/`;
  }
  env.base = `http://${env.host}${env.root}`;
  log(`${version}${sqlite ? " (sqlite)" : ""}: mlflow ${env.summary.mlflow_version} on :${env.mlflowPort}, walking ${env.base} (setup ${Date.now() - t0} ms, tmp ${env.tmp})`);
}

async function tearDown(env) {
  if (env.context) await env.context.close().catch(() => {});
  if (env.adapter) await env.adapter.stop();
  if (env.mlflow) await env.mlflow.stop();
  if (env.tmp && process.env.FLOWGATE_KEEP_TMP !== '1') fs.rmSync(env.tmp, { recursive: true, force: true });
}

function logs(env) {
  let s = '';
  if (env.mlflow) s += `\n--- mlflow log (tail)\n${tail(env.mlflow.logFile, 30)}`;
  if (env.adapter) s += `\n--- adapter log (tail)\n${tail(env.adapter.logFile, 30)}`;
  return s;
}

// ------------------------------------------------------------------ the walks
// Each step: do what a user does, wait for what a user would see, take a screenshot.

async function walkCurrent(page, env, shot) {
  await page.goto(env.base);
  await page.getByText('Welcome to MLflow').waitFor();
  await shot('01-home');

  // A fresh 3.x UI starts in "GenAI" mode, where an experiment opens on its traces;
  // a user looking at training runs switches to "Model training" first.
  await page.getByText('Model training', { exact: true }).first().click();
  await page.getByRole('link', { name: 'Experiments', exact: true }).first().click();
  await page.getByRole('link', { name: 'flowgate-demo', exact: true }).first().waitFor();
  await shot('02-experiments');

  await page.getByRole('link', { name: 'flowgate-demo', exact: true }).first().click();
  await page.getByRole('link', { name: 'demo-run-1', exact: true }).first().waitFor();
  await page.getByText('3 matching runs').waitFor();
  await shot('03-runs');

  await page.getByRole('link', { name: 'demo-run-1', exact: true }).first().click();
  await page.getByRole('heading', { name: 'demo-run-1' }).waitFor();
  await page.getByText(ACCURACY_SHOWN.current, { exact: true }).first().waitFor();
  await shot('04-run');

  // the metric's name in the run's metrics table opens its chart
  await page.getByRole('link', { name: 'accuracy', exact: true }).first().click();
  await page.getByRole('tab', { name: 'Model metrics', selected: true }).waitFor();
  await page.locator('.js-plotly-plot').first().waitFor();
  await page.getByText('demo-run-1 (accuracy)').first().waitFor();
  await shot('05-metric-accuracy');

  await page.getByRole('tab', { name: 'Artifacts' }).click();
  await page.getByText('notes.txt', { exact: true }).first().click();
  await page.getByText('final accuracy: 0.9375').first().waitFor();
  await shot('06-artifact-text');

  await page.getByText('plots', { exact: true }).first().click();
  await page.getByText('accuracy.png', { exact: true }).first().click();
  await waitForImage(page);
  await shot('07-artifact-png');
}

async function walk191(page, env, shot) {
  await page.goto(env.base);
  await page.getByRole('link', { name: 'Experiments', exact: true }).first().waitFor();
  await page.getByText('flowgate-demo', { exact: true }).first().waitFor();
  await shot('01-home');

  await page.getByRole('link', { name: 'Experiments', exact: true }).first().click();
  await page.getByText('flowgate-second', { exact: true }).first().waitFor();
  await shot('02-experiments');

  // the experiment list is the sidebar; runs show in a grid
  await page.getByText('flowgate-demo', { exact: true }).first().click();
  const row = page.locator('.ag-row', { hasText: 'demo-run-1' }).first();
  await row.waitFor();
  await page.getByText('Showing 3 matching runs').waitFor();
  await shot('03-runs');

  // in 1.9.1 the run's start time is the link to it
  await row.getByRole('link').first().click();
  await page.locator('.breadcrumb-header, h1', { hasText: 'demo-run-1' }).first().waitFor();
  await page.getByText(ACCURACY_SHOWN['1.9.1'], { exact: true }).first().waitFor();
  await shot('04-run');

  await page.getByRole('link', { name: /^\s*accuracy/ }).first().click();
  await page.locator('.js-plotly-plot').first().waitFor();
  await page.waitForURL(/#\/metric\/accuracy/);
  await shot('05-metric-accuracy');

  await page.goBack();
  await page.getByText('notes.txt', { exact: true }).first().click();
  await page.getByText('final accuracy: 0.9375').first().waitFor();
  await page.getByText('final accuracy: 0.9375').first().scrollIntoViewIfNeeded();
  await shot('06-artifact-text');

  await page.getByText('plots', { exact: true }).first().click();
  await page.getByText('accuracy.png', { exact: true }).first().click();
  // 1.9.1 shows images inside a plotly figure: an SVG <image> whose href is the artifact
  const image = page.locator('.image-container svg image').first();
  await image.waitFor({ state: 'attached' });
  await page.waitForFunction(() => {
    const i = document.querySelector('.image-container svg image');
    const href = i && (i.getAttribute('href') || i.getAttribute('xlink:href'));
    return href && /get-artifact\?path=plots%2Faccuracy\.png|^data:image\/png/.test(href);
  });
  await page.locator('.image-container').first().scrollIntoViewIfNeeded();
  await shot('07-artifact-png');
}

/** The PNG artifact (320x200, written by populate.py) is decoded and on screen (3.x: an <img>). */
async function waitForImage(page) {
  await page.waitForFunction(() => [...document.images].some((i) => i.complete && i.naturalWidth === 320 && i.naturalHeight === 200));
  const handle = await page.evaluateHandle(() => [...document.images].find((i) => i.naturalWidth === 320 && i.naturalHeight === 200));
  await handle.asElement().scrollIntoViewIfNeeded();
}

/** Undo a Content-Encoding the way a browser would. */
function decode(buf, encoding = 'identity') {
  switch (encoding.trim().toLowerCase()) {
    case 'identity': return buf;
    case 'gzip': case 'x-gzip': return zlib.gunzipSync(buf);
    case 'deflate': return zlib.inflateSync(buf);
    case 'br': return zlib.brotliDecompressSync(buf);
    case 'zstd': return zlib.zstdDecompressSync(buf); // Node >= 22.15
    default: throw new Error(`unknown content-encoding ${encoding}`);
  }
}

const WALKS = { current: walkCurrent, '1.9.1': walk191 };

// ------------------------------------------------------------------ tests

for (const spec of VERSIONS) {
  const [version, storeKind = 'file'] = spec.split(':');
  const sqlite = storeKind === 'sqlite';
  const label = sqlite ? `${version}-sqlite` : version;
  describe(`MLflow ${version} (${sqlite ? 'SQLite' : 'file'} store) ${DIRECT ? 'direct (no adapter)' : TARGET ? `running at ${TARGET}` : `behind flowgate-adapter at ${PREFIX}/`}`, () => {
    const env = {};
    before(async () => {
      try {
        await setUp(version, sqlite, env);
      } catch (e) {
        e.message += logs(env);
        throw e;
      }
    }, { timeout: 600000 });
    after(async () => { await tearDown(env); }, { timeout: 60000 });

    it('a user walks experiments -> runs -> demo-run-1 -> accuracy chart -> artifacts, every request inside the instance', { timeout: 120000 }, async () => {
      const walkFn = WALKS[version] || WALKS.current;
      const mine = (f) => f.startsWith(`${label}-`) && /^(\d\d-[a-z-]+\.png|failed\.png|requests\.json)$/.test(f.slice(label.length + 1));
      for (const f of fs.readdirSync(SHOTS)) if (mine(f)) fs.rmSync(path.join(SHOTS, f)); // stale ones
      const userDataDir = path.join(env.tmp, 'chromium-profile');
      env.context = await launchChromium(userDataDir);
      env.context.setDefaultTimeout(STEP_TIMEOUT);
      if (TARGET && TARGET.search) {
        // A `link` instance: its access link signs this browser in (a cookie
        // for the instance's path) and redirects to the clean URL. On a page of
        // its own, before requests are recorded: closing it aborts what it loads.
        const signIn = await env.context.newPage();
        await signIn.goto(TARGET.href);
        assert.ok(!signIn.url().includes('?'), `the access link should redirect to the plain URL, got ${signIn.url()}`);
        await signIn.close();
      }
      const requests = recordRequests(env.context);
      const page = env.context.pages()[0] || await env.context.newPage();
      const consoleErrors = [];
      page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
      page.on('pageerror', (e) => consoleErrors.push(`pageerror: ${e.message}`));
      const shot = async (step) => {
        await page.waitForLoadState('networkidle', { timeout: 5000 }).catch(() => {});
        await page.screenshot({ path: path.join(SHOTS, `${label}-${step}.png`) });
      };
      try {
        await walkFn(page, env, shot);
        await page.waitForLoadState('networkidle', { timeout: 5000 }).catch(() => {});
      } catch (e) {
        await page.screenshot({ path: path.join(SHOTS, `${label}-failed.png`) }).catch(() => {});
        e.message += `\n(at ${page.url()}; screenshot ${label}-failed.png)${logs(env)}`;
        throw e;
      } finally {
        fs.writeFileSync(path.join(SHOTS, `${label}-requests.json`), JSON.stringify(requests, null, 1));
        await env.context.close().catch(() => {});
        env.context = null;
      }

      assert.ok(requests.length > 5, `only ${requests.length} requests recorded`);
      const tolerated = TOLERATED[version] || TOLERATED.current;
      // (requests.json is written before this check; refetched ones are marked in the log line)
      const outside = [];
      const bad = [];
      for (const r of requests) {
        if (r.url.startsWith('data:') || r.url.startsWith('blob:')) continue;
        if (!r.url.startsWith(env.base)) { outside.push(`${r.method} ${r.url}`); continue; }
        const rel = r.url.slice(env.base.length);
        if (r.status === null && !r.finished && !r.failure) {
          // Playwright reports no outcome for some requests (the script of a web worker,
          // e.g. MLflow 3's telemetry worker): fetch it again by hand and judge that.
          const u = new URL(r.url);
          const again = await request({ port: env.port, method: r.method, path: u.pathname + u.search, headers: { Host: env.host } }).catch((e) => ({ status: null, error: e.message }));
          r.status = again.status;
          r.refetched = true;
        }
        const failed = r.failure || r.status === null || r.status >= 400;
        if (!failed) continue;
        if (!r.failure && tolerated.some((t) => t.method === r.method && t.status === r.status && t.path.test(rel))) continue;
        bad.push(`${r.method} ${r.url} -> ${r.failure || r.status}`);
      }
      const refetched = requests.filter((r) => r.refetched).map((r) => `${r.url} -> ${r.status}`);
      log(`${label}: ${requests.length} requests, ${outside.length} outside ${env.base}, ${bad.length} failed` +
        (refetched.length ? `, re-fetched (no outcome reported by the browser): ${refetched.join(', ')}` : ''));
      assert.deepEqual(outside, [], `requests left ${env.base}`);
      // a read-only instance refuses nothing the UI does while reading
      const refused = requests.filter((r) => r.status === 403 || r.status === 421).map((r) => `${r.method} ${r.url} -> ${r.status}`);
      assert.deepEqual(refused, [], 'the read-only adapter refused a request of the UI');
      const posts = [...new Set(requests.filter((r) => r.method !== 'GET').map((r) => `${r.method} ${new URL(r.url).pathname}`))];
      log(`${label}: non-GET requests of the UI: ${posts.join(', ') || 'none'}`);
      assert.deepEqual(bad, [], `requests failed (console errors: ${JSON.stringify(consoleErrors.slice(0, 10))})`);
      // the walk loaded what it shows through the instance path
      const api = requests.filter((r) => r.url.startsWith(env.base + 'ajax-api/'));
      assert.ok(api.length > 3, 'the UI called its API through the instance path');
      assert.ok(requests.some((r) => r.url.startsWith(env.base + 'get-artifact?') && r.status === 200), 'artifacts fetched through the instance path');
    });

    it("MLflow's main bundle is sent from the adapter's memory after the first request", {
      skip: DIRECT || TARGET ? 'no adapter of ours here' : false, timeout: 30000,
    }, async () => {
      const index = await request({ port: env.port, path: env.root, headers: { Host: env.host } });
      const src = /src="([^"]*static-files\/[^"]*main[^"]*\.js)"/.exec(index.body.toString())?.[1];
      assert.ok(src, 'index.html names its main bundle');
      const bundle = new URL(src, env.base).pathname;
      const get = () => request({ port: env.port, path: bundle, headers: { Host: env.host, 'Accept-Encoding': 'gzip' } });
      const first = await get();
      const second = await get();
      assert.equal(second.status, 200);
      assert.ok(second.headers.age !== undefined, `no Age: not from the static cache (${JSON.stringify(second.headers)})`);
      assert.deepEqual(decode(second.body, second.headers['content-encoding'] || 'identity'),
        decode(first.body, first.headers['content-encoding'] || 'identity'), 'the same bytes');
      const metrics = (await request({ port: env.port, path: '/metrics', headers: { Host: env.host } })).body.toString();
      const hits = Number(/flowgate_adapter_static_cache_requests_total\{result="hit"\} (\d+)/.exec(metrics)?.[1]);
      log(`${label}: static cache hits after the walk: ${hits}`);
      assert.ok(hits >= 1, 'the static cache answered');
    });

    it('an HTML artifact passes byte-identical through get-artifact (and the PNG too)', { timeout: 30000 }, async () => {
      const runId = env.summary.run.id;
      const artifactsDir = new URL(env.summary.run.artifact_uri).pathname;
      for (const name of ['report.html', 'plots/accuracy.png']) {
        const onDisk = fs.readFileSync(path.join(artifactsDir, name));
        assert.equal(sha256(onDisk), env.summary.artifacts[name].sha256, `populate.py wrote ${name}`);
        const r = await request({
          port: env.port,
          path: `${env.root}get-artifact?path=${encodeURIComponent(name)}&run_uuid=${runId}`,
          headers: { Host: env.host, 'Accept-Encoding': 'gzip, deflate, br' },
        });
        assert.equal(r.status, 200, `GET ${name}: ${r.status} ${r.body.toString().slice(0, 200)}`);
        const body = decode(r.body, r.headers['content-encoding']);
        assert.equal(body.length, onDisk.length, `${name} length (content-encoding ${r.headers['content-encoding'] ?? 'identity'})`);
        assert.equal(sha256(body), sha256(onDisk), `${name} bytes`);
      }
    });

    const postTitle = DIRECT
      ? 'without the adapter, a POST with the public Origin and Host is refused by MLflow 3.x (403) and accepted by 1.x'
      : 'a same-origin POST to the search API (Origin and Host of the public URL) succeeds';
    it(postTitle, { timeout: 30000 }, async () => {
      const publicHost = `${PUBLIC_HOST}:${env.port}`;
      const r = await request({
        port: env.port,
        method: 'POST',
        path: `${env.root}ajax-api/2.0/mlflow/runs/search`,
        headers: {
          Host: publicHost,
          Origin: `http://${publicHost}`,
          Referer: `http://${publicHost}${env.root}`,
          'Content-Type': 'application/json',
          'Sec-Fetch-Site': 'same-origin',
          'Sec-Fetch-Mode': 'cors',
        },
        body: JSON.stringify({ experiment_ids: [env.summary.experiment.id] }),
      });
      if (DIRECT) {
        // What MLflow does without the adapter: 3.x refuses the public Host/Origin.
        const expect = version.startsWith('1.') ? 200 : 403;
        assert.equal(r.status, expect, `direct POST: ${r.status} ${r.body.toString().slice(0, 200)}`);
        return;
      }
      assert.equal(r.status, 200, `POST runs/search: ${r.status} ${r.body.toString().slice(0, 300)}`);
      const names = JSON.parse(r.body.toString()).runs.map((x) => x.data.tags.find((t) => t.key === 'mlflow.runName')?.value);
      assert.ok(names.includes('demo-run-1'), `runs: ${names}`);
    });

    if (!DIRECT) {
      it('artefacts spelled as MLflow decodes them pass byte-identical and sandboxed', { timeout: 30000 }, async () => {
        const runId = env.summary.run.id;
        const artifactsDir = new URL(env.summary.run.artifact_uri).pathname;
        const onDisk = fs.readFileSync(path.join(artifactsDir, 'report.html'));
        const query = `?path=report.html&run_uuid=${runId}`;
        for (const spelling of ['get-artifact', '%67et-artifact', '%67%65%74-artifact', '/get-artifact', 'static-files/../get-artifact', 'x/%2e%2e/get-artifact']) {
          const r = await request({
            port: env.port,
            path: `${env.root}${spelling}${query}`,
            headers: { Host: env.host, 'Accept-Encoding': 'gzip, deflate, br' },
          });
          assert.equal(r.status, 200, `${spelling}: ${r.status} ${r.body.toString().slice(0, 200)}`);
          assert.equal(r.headers['content-encoding'], undefined, `${spelling}: not re-encoded`);
          assert.equal(sha256(r.body), sha256(onDisk), `${spelling}: bytes`);
          assert.equal(r.headers['content-security-policy'], 'sandbox', spelling);
          assert.equal(r.headers['x-content-type-options'], 'nosniff', spelling);
          assert.equal(typeof r.headers.date, 'string', `${spelling}: one Date`);
        }
      });

      it('writes are refused (403, JSON) and never reach MLflow; other Hosts get 421', { timeout: 30000 }, async () => {
        const publicHost = `${PUBLIC_HOST}:${env.port}`;
        const write = (p, body) => request({
          port: env.port,
          method: 'POST',
          path: `${env.root}${p}`,
          headers: {
            Host: publicHost, Origin: `http://${publicHost}`, 'Content-Type': 'application/json',
          },
          body: JSON.stringify(body),
        });
        const create = version.startsWith('1.') ? 'ajax-api/2.0/preview/mlflow/experiments/create' : 'ajax-api/2.0/mlflow/experiments/create';
        for (const [p, body] of [
          [create, { name: 'ssrf', artifact_location: 'http://169.254.169.254/latest/' }],
          ['ajax-api/2.0/mlflow/runs/delete', { run_id: env.summary.run.id }],
          ['ajax-api/2.0/mlflow/runs/%64elete', { run_id: env.summary.run.id }],
        ]) {
          const r = await write(p, body);
          assert.equal(r.status, 403, `POST ${p}: ${r.status} ${r.body.toString().slice(0, 200)}`);
          assert.equal(JSON.parse(r.body.toString()).error_code, 'PERMISSION_DENIED');
        }
        // the store is as it was: the run is alive, no experiment was added
        const runs = await write('ajax-api/2.0/mlflow/runs/search', { experiment_ids: [env.summary.experiment.id] });
        assert.equal(runs.status, 200);
        const ids = JSON.parse(runs.body.toString()).runs.map((x) => x.info.run_id || x.info.run_uuid);
        assert.ok(ids.includes(env.summary.run.id), `run still there: ${ids}`);
        const exps = await request({ port: env.port, path: `${env.root}ajax-api/2.0/${version.startsWith('1.') ? 'preview/mlflow/experiments/list' : 'mlflow/experiments/search?max_results=100'}`, headers: { Host: publicHost } });
        assert.equal(exps.status, 200, exps.body.toString().slice(0, 200));
        assert.ok(!exps.body.toString().includes('ssrf'), 'no experiment created');
        // DNS rebinding: the same adapter under another name
        const rebound = await request({ port: env.port, path: env.root, headers: { Host: `rebound.example:${env.port}` } });
        // Behind an Ingress the router already refuses a host it has no rule
        // for (404); the adapter's own 421 is what answers when it is reached.
        if (TARGET) assert.ok([404, 421].includes(rebound.status), `rebound Host: ${rebound.status}`);
        else assert.equal(rebound.status, 421);
      });

      it('the instance path without its slash redirects to it', { timeout: 15000 }, async () => {
        const r = await request({ port: env.port, path: PREFIX, headers: { Host: env.host } });
        assert.ok([301, 302, 303, 307, 308].includes(r.status), `GET ${PREFIX}: ${r.status}`);
        assert.match(r.headers.location || '', new RegExp(`^(http://${env.host.replace(/\./g, '\\.')})?${PREFIX}/$`));
      });
    }
  });
}
