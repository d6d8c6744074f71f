// The Node SDK against a real LSPM (a `dedi lspm` process, see
// ../testing/lspm.mjs). Each test spawns an idle node process through the
// LSPM and speaks for it with the token the LSPM gave it (read from
// /proc/PID/environ), so each SDK call and its effect on the LSPM can be
// checked one by one.
//
// Ports 37000-37499 on 127.0.0.252 (see ../testing/lspm.mjs).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as delay } from 'node:timers/promises';
import { IDLE, gameEnv, portBlocks, startLSPM } from '../testing/lspm.mjs';
import {
  AbortError,
  Client,
  ClosedError,
  ConnectionError,
  ProblemError,
  configFromEnv,
  fromEnv,
} from '../index.js';

const ports = portBlocks(37000, 37499, 50);

// Heartbeats every 200 ms, unhealthy after 5 missed: quick, yet a loaded
// CI machine does not make the idle game look hung.
const health = { periodSeconds: 0.2, failureThreshold: 5 };

/**
 * spawnIdle starts an idle game and returns it with a client speaking for it.
 * @param {import('../testing/lspm.mjs').LSPM} l
 * @param {Record<string, unknown>} [req]
 * @param {Partial<import('../index.js').Config>} [extra]
 */
async function spawnIdle(l, req = {}, extra = {}) {
  const p = await l.spawn({ command: IDLE, health, ...req });
  const client = fromEnv({ env: gameEnv(p.pid), ...extra });
  return { p, client };
}

/** A logger that keeps what it is told. */
function memoryLogger() {
  /** @type {{ level: string, msg: string, fields: any }[]} */
  const lines = [];
  return {
    lines,
    info: (/** @type {string} */ msg, /** @type {any} */ fields) => lines.push({ level: 'info', msg, fields }),
    warn: (/** @type {string} */ msg, /** @type {any} */ fields) => lines.push({ level: 'warn', msg, fields }),
  };
}

test('configFromEnv reads the environment the LSPM gives a process', { timeout: 30_000 }, async (t) => {
  const l = await startLSPM(t, { ports: ports() });
  const params = { map: 'arena', round: 3, rules: { friendlyFire: false, tags: ['a', 'b'] } };
  const p = await l.spawn({
    command: IDLE, fleet: 'demo', params, ports: ['game', 'query'], health: { periodSeconds: 0.25 },
  });
  const cfg = configFromEnv(gameEnv(p.pid));
  assert.equal(cfg.processId, p.id);
  assert.equal(cfg.url, l.url);
  assert.match(cfg.token, /.{20,}/);
  assert.deepEqual(cfg.params, params);
  assert.deepEqual(cfg.ports, { game: p.ports.game, query: p.ports.query });
  assert.equal(cfg.heartbeatMs, 250);
  assert.equal(cfg.machineId, 'm-node');
  assert.equal(cfg.fleet, 'demo');

  const c = new Client(cfg);
  assert.equal(c.id, p.id);
  assert.equal(c.port('GAME'), p.ports.game);
  assert.equal(c.port('nope'), undefined);
  const got = c.params;
  got.map = 'changed';
  assert.equal(c.params.map, 'arena', 'params must be a copy');
  assert.equal(c.state, '');
});

test('ready, then heartbeats carry the player count to the LSPM', { timeout: 30_000 }, async (t) => {
  const l = await startLSPM(t, { ports: ports() });
  /** @type {string[]} */
  const states = [];
  const { p, client } = await spawnIdle(l, {}, { onState: (q) => states.push(q.state) });
  t.after(() => client.close());
  assert.equal(client.heartbeatMs, 200);

  const r = await client.ready();
  assert.equal(r.id, p.id);
  assert.equal(r.state, 'ready');
  assert.equal(client.state, 'ready');
  assert.equal((await l.get(p.id)).state, 'ready');
  const readyAt = Date.parse(r.readyAt ?? '');

  client.setPlayers(3);
  client.start();
  client.start(); // a second start does nothing
  await l.waitFor(p.id, (q) => q.players === 3 && Date.parse(q.lastHeartbeatAt) > readyAt, 'players 3');
  client.setPlayers(5);
  client.setInstances(2);
  await l.waitFor(p.id, (q) => q.players === 5 && q.instances === 2, 'players 5, instances 2');

  // The process token reads its own process.
  const own = await client.process();
  assert.equal(own.id, p.id);
  assert.equal(own.players, 5);
  assert.deepEqual(states, ['ready']);

  // close stops the loop: no heartbeat after it.
  await client.close();
  await client.close(); // safe twice
  const last = (await l.get(p.id)).lastHeartbeatAt;
  await delay(3 * client.heartbeatMs);
  assert.equal((await l.get(p.id)).lastHeartbeatAt, last);
  await assert.rejects(client.heartbeat(), ClosedError);
  await assert.rejects(client.run(), ClosedError);
});

test('an error answer is a ProblemError with the problem code, not retried, and changes nothing', { timeout: 30_000 }, async (t) => {
  const l = await startLSPM(t, { ports: ports() });
  const { p, client } = await spawnIdle(l);
  const other = await l.spawn({ command: IDLE, health });
  const cfg = configFromEnv(gameEnv(p.pid));

  // A wrong token: 401 unauthorized, at once (ready retries only 5xx and
  // unreachable LSPMs).
  const wrong = new Client({ ...cfg, token: 'not-the-token-0123456789abcdef' });
  await assert.rejects(wrong.ready(), (err) => {
    assert.ok(err instanceof ProblemError, String(err));
    assert.equal(err.status, 401);
    assert.equal(err.code, 'unauthorized');
    assert.equal(err.retryable, false);
    assert.equal(err.operation, 'ready');
    return true;
  });
  // Its token on another process: 403 forbidden.
  const trespasser = new Client({ ...cfg, processId: other.id });
  await assert.rejects(trespasser.ready(), { name: 'ProblemError', status: 403, code: 'forbidden' });
  await assert.rejects(trespasser.process(), { code: 'forbidden' });
  // A player count the LSPM refuses: 400 invalid.
  client.setPlayers(2_000_000);
  await assert.rejects(client.heartbeat(), { name: 'ProblemError', status: 400, code: 'invalid' });
  assert.throws(() => client.setPlayers(-1), RangeError);
  assert.throws(() => client.setPlayers(1.5), RangeError);

  const after = await l.get(p.id);
  assert.equal(after.state, 'starting');
  assert.equal(after.players, 0);
  assert.equal(after.lastHeartbeatAt, null);
  assert.equal((await l.get(other.id)).state, 'starting');
});

test('ready rides out an LSPM kill -9 and restart; an abort ends the retries', { timeout: 30_000 }, async (t) => {
  const l = await startLSPM(t, { ports: ports() });
  const { p, client } = await spawnIdle(l);
  t.after(() => client.close());

  await l.kill9();
  let settled = false;
  const pending = client.ready().finally(() => {
    settled = true;
  });
  await delay(400);
  assert.equal(settled, false, 'ready gave up while the LSPM was down');
  await l.start();
  const r = await pending;
  assert.equal(r.state, 'ready');
  assert.equal((await l.get(p.id)).state, 'ready');

  await l.kill9();
  await assert.rejects(client.heartbeat(), (err) => err instanceof ConnectionError && err.retryable);
  const t0 = Date.now();
  await assert.rejects(client.shutdown({ signal: AbortSignal.timeout(300) }), (err) => {
    assert.ok(err instanceof AbortError, String(err));
    assert.equal(err.code, 'ABORT_ERR');
    assert.ok(err.lastError instanceof ConnectionError, String(err.lastError));
    assert.equal(/** @type {any} */ (err.cause).name, 'TimeoutError');
    return true;
  });
  assert.ok(Date.now() - t0 < 2000, `the abort took ${Date.now() - t0} ms`);
  // close ends retries in progress too.
  const closing = client.shutdown();
  await delay(100);
  await client.close();
  await assert.rejects(closing, ClosedError);
});

test('the heartbeat loop rides out an LSPM kill -9 and restart', { timeout: 30_000 }, async (t) => {
  const l = await startLSPM(t, { ports: ports() });
  const log = memoryLogger();
  const { p, client } = await spawnIdle(l, {}, { logger: log });
  t.after(() => client.close());
  await client.ready();
  client.setPlayers(2);
  client.start();
  await l.waitFor(p.id, (q) => q.players === 2, 'players 2');

  await l.kill9();
  client.setPlayers(7);
  await delay(3 * client.heartbeatMs); // beats fail meanwhile
  await l.start();
  // A restarted LSPM forgets the player count until the next heartbeat.
  await l.waitFor(p.id, (q) => q.players === 7, 'players 7 after the restart');
  // The LSPM has the beat; the SDK logs its recovery once the answer is in.
  for (const until = Date.now() + 5000; log.lines.length < 2 && Date.now() < until;) await delay(10);
  assert.deepEqual(log.lines.map((x) => `${x.level} ${x.msg}`), [
    'warn dedi sdk: heartbeat failed; retrying every period',
    'info dedi sdk: heartbeat recovered',
  ]);
  assert.ok(log.lines[1].fields.failures >= 2, JSON.stringify(log.lines));
  assert.equal(log.lines[0].fields.process, p.id);
  // Still healthy well past the failure threshold.
  await delay(6 * client.heartbeatMs);
  assert.equal((await l.get(p.id)).state, 'ready');
});

test('run ends with its signal; shutdown announces the end and the LSPM ends the process', { timeout: 30_000 }, async (t) => {
  const l = await startLSPM(t, { ports: ports(), extra: ['--grace', '300ms'] });
  const { p, client } = await spawnIdle(l);
  t.after(() => client.close());
  await client.ready();

  const ac = new AbortController();
  const running = client.run({ signal: ac.signal });
  client.setPlayers(4);
  await l.waitFor(p.id, (q) => q.players === 4, 'players 4');
  ac.abort();
  await assert.rejects(running, AbortError);

  // The idle game announces its end but does not exit: the LSPM ends it
  // after the grace, as it promises.
  const s = await client.shutdown();
  assert.equal(s?.id, p.id);
  const end = await l.waitFor(p.id, (q) => q.endedAt !== null, 'the end');
  assert.equal(end.state, 'killed');
  // A heartbeat of an ended process learns its end.
  const hb = await client.heartbeat();
  assert.equal(hb.state, 'killed');
  assert.equal(client.state, 'killed');
});
