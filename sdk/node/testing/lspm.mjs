// Test support for the Node SDK's tests: a real `dedi lspm` started and
// killed the way test/e2e's harness does it. It lives outside test/ so that
// `node --test test/` does not run it as a test file.
//
// The binary is $DEDI_BIN when set (test/e2e sets it to the dedi it built);
// otherwise it is built once per test file with `go build` (CGO_ENABLED=0).
//
// Every LSPM here listens on 127.0.0.252 (no other test uses that address:
// test/e2e's VMMs take 127.0.0.20-190, the local provider's tests
// 127.0.0.200-250) and hands out game ports from 37000-37999, a block no
// other test uses (test/e2e's LSPMs take 27000-32767, its VMMs 51000
// upwards, its benchmarks 39000-39199). Each test file owns a part of that
// block and each LSPM a slice of its file's part.

import { spawn, execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { closeSync, existsSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, unlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as delay } from 'node:timers/promises';

export const repoRoot = fileURLToPath(new URL('../../..', import.meta.url));
export const sdkDir = fileURLToPath(new URL('..', import.meta.url));
export const ADDRESS = '127.0.0.252';
export const MACHINE_TOKEN = 'machine-token-for-node-tests-0123456789';

let builtBin = '';

/** dediBin returns the dedi binary to run, building it when DEDI_BIN is unset. */
export function dediBin() {
  if (process.env.DEDI_BIN) {
    return process.env.DEDI_BIN;
  }
  if (builtBin) {
    return builtBin;
  }
  const dir = mkdtempSync(join(tmpdir(), 'dedi-node-test-bin-'));
  process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
  const out = join(dir, 'dedi');
  execFileSync('go', ['build', '-o', out, './cmd/dedi'], {
    cwd: repoRoot,
    env: { ...process.env, CGO_ENABLED: '0' },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  builtBin = out;
  return out;
}

/**
 * portBlocks hands out [lo, hi] slices of size n from lo..hi.
 * @param {number} lo
 * @param {number} hi
 * @param {number} n
 */
export function portBlocks(lo, hi, n) {
  let next = lo;
  return () => {
    if (next + n - 1 > hi) {
      throw new Error(`out of ports in ${lo}-${hi}`);
    }
    const b = [next, next + n - 1];
    next += n;
    return b;
  };
}

/** LSPM is one running dedi lspm. */
export class LSPM {
  /**
   * @param {{ ports: number[], extra?: string[] }} opts
   */
  constructor(opts) {
    this.token = MACHINE_TOKEN;
    this.dir = mkdtempSync(join(tmpdir(), 'dedi-node-lspm-'));
    this.dataDir = join(this.dir, 'data');
    this.logPath = join(this.dir, 'lspm.log');
    this.url = '';
    this.args = [
      'lspm', '--listen', `${ADDRESS}:0`, '--data-dir', this.dataDir, '--machine-id', 'm-node',
      '--max-processes', '8', '--port-range', `${opts.ports[0]}-${opts.ports[1]}`,
      '--allow', process.execPath, ...(opts.extra ?? []),
    ];
    /** @type {import('node:child_process').ChildProcess | null} */
    this.child = null;
  }

  /** start starts the LSPM (again, on the same address after the first time). */
  async start() {
    if (this.url) {
      const i = this.args.indexOf('--listen');
      this.args[i + 1] = this.url.replace('http://', '');
    }
    const addrFile = join(this.dataDir, 'lspm.addr');
    if (existsSync(addrFile)) unlinkSync(addrFile);
    const fd = openSync(this.logPath, 'a');
    this.child = spawn(dediBin(), this.args, {
      env: { ...process.env, DEDI_MACHINE_TOKEN: this.token },
      stdio: ['ignore', fd, fd],
    });
    closeSync(fd);
    const child = this.child;
    const deadline = Date.now() + 10_000;
    for (;;) {
      try {
        const addr = readFileSync(addrFile, 'utf8');
        if (addr) {
          this.url = `http://${addr}`;
          return;
        }
      } catch {
        // not yet
      }
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new Error(`lspm exited at start:\n${this.log()}`);
      }
      if (Date.now() > deadline) {
        throw new Error(`lspm did not start:\n${this.log()}`);
      }
      await delay(5);
    }
  }

  /** kill9 kills the LSPM alone, as an OOM killer or a crash would. */
  async kill9() {
    const c = this.child;
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    const exited = once(c, 'exit');
    c.kill('SIGKILL');
    await exited;
  }

  /** log returns what the LSPM wrote. */
  log() {
    try {
      return readFileSync(this.logPath, 'utf8');
    } catch {
      return '';
    }
  }

  /** cleanup kills the LSPM and every shim and game it left, then removes its files. */
  async cleanup() {
    await this.kill9();
    const pids = [];
    const procDir = join(this.dataDir, 'processes');
    for (const id of existsSync(procDir) ? readdirSync(procDir) : []) {
      let rec;
      try {
        rec = JSON.parse(readFileSync(join(procDir, id, 'record.json'), 'utf8'));
      } catch {
        continue;
      }
      if (rec.process?.endedAt) continue;
      if (rec.shimPid > 0 && cmdline(rec.shimPid).includes('shim')) {
        tryKill(rec.shimPid);
        pids.push(rec.shimPid);
      }
      if (rec.process?.pid > 0) {
        tryKill(-rec.process.pid);
        pids.push(rec.process.pid);
      }
    }
    const deadline = Date.now() + 5000;
    for (const pid of pids) {
      while (alive(pid) && Date.now() < deadline) await delay(2);
    }
    rmSync(this.dir, { recursive: true, force: true });
  }

  /**
   * call makes a request with the machine token and returns the status and
   * the decoded answer (text when not JSON).
   * @param {string} method
   * @param {string} path
   * @param {unknown} [body]
   * @returns {Promise<{ status: number, body: any }>}
   */
  async call(method, path, body) {
    const res = await fetch(this.url + path, {
      method,
      headers: { Authorization: `Bearer ${this.token}`, 'Content-Type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    let parsed;
    try {
      parsed = JSON.parse(text);
    } catch {
      parsed = text;
    }
    return { status: res.status, body: parsed };
  }

  /**
   * spawn starts a process and returns it (state starting).
   * @param {Record<string, unknown>} req
   */
  async spawn(req) {
    const { status, body } = await this.call('POST', '/v1/processes', req);
    if (status !== 201) throw new Error(`spawn: ${status} ${JSON.stringify(body)}`);
    return body;
  }

  /** @param {string} id */
  async get(id) {
    const { status, body } = await this.call('GET', `/v1/processes/${id}`);
    if (status !== 200) throw new Error(`get ${id}: ${status} ${JSON.stringify(body)}`);
    return body;
  }

  /** @param {string} id */
  async logs(id) {
    return (await this.call('GET', `/v1/processes/${id}/logs`)).body;
  }

  /**
   * waitFor polls the process until pred holds, and returns it.
   * @param {string} id
   * @param {(p: any) => boolean} pred
   * @param {string} what  said when it never holds
   * @param {number} [timeoutMs]
   */
  async waitFor(id, pred, what, timeoutMs = 10_000) {
    const deadline = Date.now() + timeoutMs;
    let p;
    for (;;) {
      p = await this.get(id);
      if (pred(p)) return p;
      if (Date.now() > deadline) {
        throw new Error(`process ${id}: ${what} not seen in ${timeoutMs} ms; last ${JSON.stringify(p)}\nits log:\n${await this.logs(id)}`);
      }
      await delay(10);
    }
  }
}

/**
 * startLSPM starts an LSPM that the test's end kills with all it started.
 * @param {import('node:test').TestContext} t
 * @param {{ ports: number[], extra?: string[] }} opts
 */
export async function startLSPM(t, opts) {
  const l = new LSPM(opts);
  t.after(async () => {
    if (/** @type {any} */ (t).passed === false) { // TestContext.passed: Node 20.20, not yet in @types/node 20
      t.diagnostic(`lspm log:\n${l.log()}`);
    }
    await l.cleanup();
  });
  await l.start();
  return l;
}

/** A game that does nothing until it is killed: the tests talk to the LSPM in its place with its token. */
export const IDLE = [process.execPath, '-e', 'setInterval(() => {}, 1 << 30)'];

/**
 * gameEnv returns the environment of a running process, as the LSPM gave it.
 * @param {number} pid
 * @returns {Record<string, string>}
 */
export function gameEnv(pid) {
  const raw = readFileSync(`/proc/${pid}/environ`, 'utf8');
  /** @type {Record<string, string>} */
  const env = {};
  for (const kv of raw.split('\0')) {
    const i = kv.indexOf('=');
    if (i > 0) env[kv.slice(0, i)] = kv.slice(i + 1);
  }
  return env;
}

/** @param {number} pid */
function cmdline(pid) {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8');
  } catch {
    return '';
  }
}

/** @param {number} pid */
function tryKill(pid) {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // gone already
  }
}

/**
 * alive reports whether pid runs (and is not a zombie).
 * @param {number} pid
 */
export function alive(pid) {
  let s;
  try {
    s = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return false;
  }
  const i = s.lastIndexOf(')');
  return i > 0 && s[i + 2] !== 'Z' && s[i + 2] !== 'X';
}
