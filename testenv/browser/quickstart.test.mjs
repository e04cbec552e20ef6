// The README's main job, as a person would check it: run ./quickstart (the
// local backend behind the REST API), open the URL it prints in Debian's headless
// Chromium, and find the example run and its accuracy on screen.
//
//   node --test quickstart.test.mjs
// Env: FLOWGATE_BIN (flowgate binary; default <repo>/target/debug/flowgate)
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, test } from 'node:test';

import { ROOT, freePort, launchChromium, log, mkTemp, recordRequests } from './lib.mjs';

const SHOTS = process.env.FLOWGATE_SCREENSHOTS || path.join(ROOT, 'target', 'screenshots');
fs.mkdirSync(SHOTS, { recursive: true });

let quickstart;
let context;
const tmp = mkTemp('flowgate-quickstart-');

after(async () => {
  if (context) await context.close().catch(() => {});
  if (quickstart && quickstart.exitCode === null) {
    quickstart.kill('SIGTERM');
    await new Promise((r) => quickstart.once('exit', r));
  }
  fs.rmSync(tmp, { recursive: true, force: true });
});

test('./quickstart serves the example job in a browser', { timeout: 600_000 }, async () => {
  const listen = `127.0.0.1:${await freePort()}`;
  const api = `127.0.0.1:${await freePort()}`;
  quickstart = spawn(path.join(ROOT, 'quickstart'), [], {
    cwd: ROOT,
    env: {
      ...process.env,
      FLOWGATE_BIN: process.env.FLOWGATE_BIN || path.join(ROOT, 'target', 'debug', 'flowgate'),
      FLOWGATE_QUICKSTART_LISTEN: listen,
      FLOWGATE_QUICKSTART_API: api,
      // long enough for the walk, short enough to see it sleep and wake
      FLOWGATE_IDLE_AFTER: '15s',
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  quickstart.stderr.on('data', (d) => { stderr += d; });
  const url = await new Promise((resolve, reject) => {
    let out = '';
    quickstart.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/is ready: (http:\/\/\S+)/);
      if (m) resolve(m[1]);
    });
    quickstart.once('exit', (code) => reject(new Error(`quickstart exited ${code}:\n${stderr}`)));
  });
  log(`quickstart printed ${url}`);
  assert.ok(url.startsWith(`http://${listen}/`), url);

  context = await launchChromium(path.join(tmp, 'profile'));
  const requests = recordRequests(context);
  const page = await context.newPage();
  // The plain URL alone does not open it (access `link`): a 401 page.
  const plain = url.replace(/\?.*$/, '');
  const refused = await page.goto(plain);
  assert.equal(refused.status(), 401);
  assert.match(await page.content(), /access link/);
  // The access link signs the browser in and leaves the address bar clean.
  await page.goto(url);
  assert.equal(page.url(), plain, 'the token leaves the address bar');
  await page.getByText('Model training', { exact: true }).first().click();
  await page.getByRole('link', { name: 'Experiments', exact: true }).first().click();
  await page.getByRole('link', { name: 'flowgate-demo', exact: true }).first().click();
  await page.getByRole('link', { name: 'demo-run-1', exact: true }).first().click();
  await page.getByRole('heading', { name: 'demo-run-1' }).waitFor();
  await page.getByText('0.9375', { exact: true }).first().waitFor();
  await page.screenshot({ path: path.join(SHOTS, 'quickstart-run.png') });

  const prefix = new URL(url).pathname;
  const strays = requests.filter((r) => /^https?:/.test(r.url) && !new URL(r.url).pathname.startsWith(prefix));
  assert.deepEqual(strays, [], 'every request stays under the instance path');
  // the deliberate 401 of the plain URL above is the only refusal
  const failed = requests.filter((r) => r.failure || (r.status >= 400 && !/users\/current$/.test(r.url)
    && !(r.status === 401 && r.url === plain)));
  assert.deepEqual(failed, [], 'no request failed');

  // Nobody visits for a while: the instance sleeps (MLflow stopped). The
  // next visit, from the signed-in browser, shows the waking page, then the
  // page it asked for, fragment included.
  await page.close();
  const id = prefix.split('/')[1];
  const phase = async () => (await (await fetch(`http://${api}/api/v1/instances/${id}`)).json()).phase;
  for (let i = 0; i < 240 && (await phase()) !== 'Sleeping'; i++) await new Promise((r) => setTimeout(r, 250));
  assert.equal(await phase(), 'Sleeping');
  const again = await context.newPage();
  const woken = Date.now();
  const wanted = `${plain}#/experiments`;
  await again.goto(wanted);
  await again.getByRole('link', { name: 'flowgate-demo', exact: true }).first().waitFor({ timeout: 120_000 });
  const wakeMs = Date.now() - woken;
  log(`wake: visit to the MLflow page loaded in ${wakeMs} ms`);
  fs.writeFileSync(path.join(SHOTS, 'wake-ms.txt'), `${wakeMs}\n`);
  assert.equal(again.url(), wanted, 'the woken page is the one asked for, fragment included');
  assert.equal(await phase(), 'Ready');
  await again.screenshot({ path: path.join(SHOTS, 'quickstart-woken.png') });
});
