// testenv/browser/wake.mjs URL: a sleeping instance woken by a visit in
// headless Chromium, as a person would see it: the waking page first, then
// the MLflow page asked for (fragment kept) once the instance serves again.
// Prints `wake: visit to the MLflow page loaded in N ms`; exit 0 only then.
// URL's host must be PUBLIC_HOST (Chromium maps it to 127.0.0.1).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { launchChromium, log, PUBLIC_HOST } from './lib.mjs';

const wanted = process.argv[2];
assert.ok(wanted, 'usage: wake.mjs URL');
assert.equal(new URL(wanted).hostname, PUBLIC_HOST, `the URL's host must be ${PUBLIC_HOST}`);
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'flowgate-wake-'));
const context = await launchChromium(path.join(tmp, 'profile'));
try {
  const page = await context.newPage();
  const started = Date.now();
  const first = await page.goto(wanted);
  assert.equal(first.status(), 503, 'a sleeping instance answers its first visit with the waking page');
  assert.equal(await page.title(), 'Waking up');
  await page.getByRole('link', { name: 'flowgate-demo', exact: true }).first().waitFor({ timeout: 180_000 });
  const ms = Date.now() - started;
  assert.equal(page.url(), wanted, 'the woken page is the one asked for, fragment included');
  log(`wake: visit to the MLflow page loaded in ${ms} ms`);
} finally {
  await context.close().catch(() => {});
  fs.rmSync(tmp, { recursive: true, force: true });
}
