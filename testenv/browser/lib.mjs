// Helpers for the browser walk: real MLflow, the real adapter, Debian's Chromium.
// Every process started here runs in its own process group and is killed with it.
import { spawn, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const HERE = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(HERE, '..', '..');
export const MLFLOW_DIR = path.join(ROOT, 'testenv', 'mlflow');

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function log(...args) {
  if (process.env.FLOWGATE_WALK_QUIET !== '1') console.error('[walk]', ...args);
}

/** A loopback port that was free a moment ago. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

// ---------------------------------------------------------------- processes

const children = new Set();

function killGroup(child, signal) {
  try {
    process.kill(-child.pid, signal);
  } catch {
    try { child.kill(signal); } catch { /* gone */ }
  }
}

// Last resort if the runner dies without running `after` hooks.
process.on('exit', () => { for (const c of children) killGroup(c, 'SIGKILL'); });
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.once(sig, () => { for (const c of children) killGroup(c, 'SIGKILL'); process.exit(130); });
}

/**
 * Start a long-running process in a new process group, output to logFile.
 * Returns { child, logFile, stop(), exited }.
 */
export function startProcess(cmd, args, { logFile, env, cwd } = {}) {
  const out = fs.openSync(logFile, 'a');
  const child = spawn(cmd, args, {
    cwd: cwd || ROOT,
    env: { ...process.env, ...env },
    detached: true,
    stdio: ['ignore', out, out],
  });
  fs.closeSync(out);
  children.add(child);
  let exitInfo = null;
  const exited = new Promise((resolve) => {
    child.on('exit', (code, signal) => { exitInfo = { code, signal }; children.delete(child); resolve(exitInfo); });
    child.on('error', (err) => { exitInfo = { code: -1, signal: null, err }; children.delete(child); resolve(exitInfo); });
  });
  return {
    child,
    logFile,
    exited,
    get exitInfo() { return exitInfo; },
    async stop() {
      if (exitInfo) { killGroup(child, 'SIGKILL'); return exitInfo; } // leftovers of the group
      killGroup(child, 'SIGTERM');
      const t = await Promise.race([exited, sleep(5000).then(() => null)]);
      // the group may hold workers (gunicorn/uvicorn) that outlive the leader
      killGroup(child, 'SIGKILL');
      return t || (await Promise.race([exited, sleep(2000)]));
    },
  };
}

export function tail(file, n = 40) {
  try {
    const lines = fs.readFileSync(file, 'utf8').split('\n');
    return lines.slice(-n).join('\n');
  } catch {
    return `(no ${file})`;
  }
}

/** Run to completion (for short commands); throws with output on failure. */
export function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { cwd: ROOT, encoding: 'utf8', maxBuffer: 64 << 20, ...opts });
  if (r.status !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} failed (${r.status ?? r.signal}):\n${r.stdout}\n${r.stderr}`);
  }
  return r.stdout;
}

// ---------------------------------------------------------------- http

/** Plain HTTP request with full control of headers (Host included). */
export function request({ port, host = '127.0.0.1', method = 'GET', path: p = '/', headers = {}, body, timeout = 15000 }) {
  return new Promise((resolve, reject) => {
    // like a browser: a body goes with its Content-Length (MLflow 3 drops chunked bodies)
    if (body !== undefined && !Object.keys(headers).some((k) => k.toLowerCase() === 'content-length')) {
      headers = { ...headers, 'Content-Length': Buffer.byteLength(body) };
    }
    const req = http.request({ host, port, method, path: p, headers, timeout }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`timeout ${method} ${p}`)));
    req.on('error', reject);
    if (body !== undefined) req.write(body);
    req.end();
  });
}

/** Poll until GET path answers `want` (default 200); throws after timeoutMs or if proc exits. */
export async function waitHttp(port, p, { want = 200, timeoutMs = 60000, proc, headers } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last = 'no answer';
  while (Date.now() < deadline) {
    if (proc && proc.exitInfo) throw new Error(`process exited (${JSON.stringify(proc.exitInfo)}) before ${p} answered:\n${tail(proc.logFile)}`);
    try {
      const r = await request({ port, path: p, headers, timeout: 3000 });
      if (r.status === want) return r;
      last = `status ${r.status}`;
    } catch (e) {
      last = e.message;
    }
    await sleep(250);
  }
  throw new Error(`http://127.0.0.1:${port}${p} did not answer ${want} in ${timeoutMs} ms (last: ${last})` + (proc ? `\n${tail(proc.logFile)}` : ''));
}

// ---------------------------------------------------------------- MLflow

/** Create (once) the venv for an MLflow version; returns its path. */
export function venv(version) {
  return run(path.join(MLFLOW_DIR, 'venv'), [version], { stdio: ['ignore', 'pipe', 'inherit'] }).trim().split('\n').pop();
}

/** Populate a file store (storeDir = the mlruns folder), or with sqlite storeDir/mlflow.db +
 * storeDir/artifacts, with the demo data; returns populate.py's JSON summary. */
export function populate(venvDir, storeDir, { sqlite = false } = {}) {
  const args = [path.join(MLFLOW_DIR, 'populate.py'), '--store', storeDir];
  if (sqlite) args.push('--sqlite');
  const out = run(path.join(venvDir, 'bin', 'python'), args);
  return JSON.parse(out);
}

export async function startMlflow(version, storeDir, port, logFile) {
  const proc = startProcess(path.join(MLFLOW_DIR, 'serve'), [version, storeDir, String(port)], { logFile });
  await waitHttp(port, '/health', { proc, timeoutMs: 90000 });
  return proc;
}

// ---------------------------------------------------------------- adapter

export function adapterBin() {
  return process.env.FLOWGATE_ADAPTER_BIN || path.join(ROOT, 'target', 'debug', 'flowgate-adapter');
}

export async function startAdapter({ port, upstreamPort, prefix, logFile, extraArgs = [] }) {
  const bin = adapterBin();
  if (!fs.existsSync(bin)) {
    throw new Error(`adapter binary ${bin} not found: build it (cargo build -p adapter), set FLOWGATE_ADAPTER_BIN, or set FLOWGATE_WALK_DIRECT=1 to walk MLflow without it`);
  }
  const proc = startProcess(bin, [
    '--listen', `127.0.0.1:${port}`,
    '--upstream', `http://127.0.0.1:${upstreamPort}`,
    '--prefix', prefix,
    ...extraArgs,
  ], { logFile, env: { RUST_LOG: process.env.RUST_LOG || 'info' } });
  await waitHttp(port, '/healthz', { proc, timeoutMs: 20000 });
  await waitHttp(port, '/readyz', { proc, timeoutMs: 30000 });
  return proc;
}

// ---------------------------------------------------------------- browser

export const CHROMIUM = process.env.FLOWGATE_CHROMIUM || '/usr/bin/chromium';
export const PUBLIC_HOST = 'mlflow.example.test';

export async function launchChromium(userDataDir) {
  if (!fs.existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} not found: apt-get install -y chromium (or set FLOWGATE_CHROMIUM)`);
  let chromium;
  try {
    ({ chromium } = await import('playwright-core'));
  } catch (e) {
    throw new Error(`playwright-core is not installed: (cd testenv/browser && npm ci) (${e.message})`);
  }
  return chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1400, height: 900 },
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      `--host-resolver-rules=MAP ${PUBLIC_HOST} 127.0.0.1`,
    ],
  });
}

/** Record every request of a browser context. */
export function recordRequests(context) {
  const entries = [];
  const byReq = new Map();
  context.on('request', (r) => {
    const e = { method: r.method(), url: r.url(), type: r.resourceType(), status: null, failure: null, finished: false };
    byReq.set(r, e);
    entries.push(e);
  });
  context.on('response', (res) => {
    const e = byReq.get(res.request());
    if (e) e.status = res.status();
  });
  context.on('requestfinished', async (r) => {
    const e = byReq.get(r);
    if (!e) return;
    e.finished = true;
    if (e.status === null) {
      // some requests (a web worker's script) get no 'response' event; ask the request
      const res = await r.response().catch(() => null);
      if (res) e.status = res.status();
    }
  });
  context.on('requestfailed', (r) => {
    const e = byReq.get(r);
    if (e) e.failure = r.failure()?.errorText || 'failed';
  });
  return entries;
}

export function sha256(buf) {
  return crypto.createHash('sha256').update(buf).digest('hex');
}

export function mkTemp(prefix) {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}
