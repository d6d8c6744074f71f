// The conformance driver (conformance-driver.mjs) under a real LSPM: the
// whole sequence, with a kill -9 and restart of the LSPM in between. This
// also is the SDK's end-to-end test of shutdown and exit from a game server
// process of its own.
//
// Ports 37500-37999 on 127.0.0.252 (see ../testing/lspm.mjs).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, renameSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { portBlocks, startLSPM, alive } from '../testing/lspm.mjs';

const ports = portBlocks(37500, 37999, 50);
const driver = fileURLToPath(new URL('./conformance-driver.mjs', import.meta.url));

/**
 * control writes the control file atomically, as the sequence does.
 * @param {string} path
 * @param {{ players: number, shutdown: boolean }} v
 */
function control(path, v) {
  writeFileSync(`${path}.tmp`, JSON.stringify(v));
  renameSync(`${path}.tmp`, path);
}

test('the conformance driver: ready, players, LSPM kill -9 and restart, players, shutdown, exit 0', { timeout: 60_000 }, async (t) => {
  const l = await startLSPM(t, { ports: ports() });
  const dir = mkdtempSync(join(tmpdir(), 'dedi-node-conformance-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const ctl = join(dir, 'control.json');
  // No control file yet: the driver keeps its start values (0 players).
  const p = await l.spawn({
    command: [process.execPath, driver],
    env: { CONFORMANCE_CONTROL: ctl },
    ports: [],
    health: { periodSeconds: 0.5, failureThreshold: 4 },
  });
  await l.waitFor(p.id, (q) => q.state === 'ready', 'ready');

  control(ctl, { players: 3, shutdown: false });
  await l.waitFor(p.id, (q) => q.players === 3, 'players 3');

  await l.kill9();
  control(ctl, { players: 6, shutdown: false });
  await delay(500); // heartbeats fail meanwhile; the driver must not mind
  assert.ok(alive(p.pid), 'the driver died while its LSPM was down');
  await l.start();
  await l.waitFor(p.id, (q) => q.state === 'ready' && q.players === 6, 'ready with players 6 after the restart');

  // An unparsable control file keeps the previous values.
  writeFileSync(ctl, '{"players": 9, "shut');
  await delay(300);
  assert.equal((await l.get(p.id)).players, 6);

  control(ctl, { players: 6, shutdown: true });
  const end = await l.waitFor(p.id, (q) => q.endedAt !== null, 'the end');
  assert.equal(end.state, 'exited', JSON.stringify(end.exit));
  assert.equal(end.exit.code, 0);
  const logs = await l.logs(p.id);
  const milestones = logs.split('\n').filter((/** @type {string} */ s) => s.startsWith('conformance: '));
  assert.deepEqual(milestones, ['conformance: ready', 'conformance: shutdown'], logs);
  // Its heartbeats failed while the LSPM was down, and it said so.
  assert.match(logs, /heartbeat failed/);
  assert.match(logs, /heartbeat recovered/);
});

test('the conformance driver refuses to run without CONFORMANCE_CONTROL', { timeout: 30_000 }, async (t) => {
  const l = await startLSPM(t, { ports: ports() });
  const p = await l.spawn({ command: [process.execPath, driver], ports: [] });
  const end = await l.waitFor(p.id, (q) => q.endedAt !== null, 'the end');
  assert.equal(end.state, 'crashed');
  assert.equal(end.exit.code, 2);
  assert.match(end.exit.logTail.join('\n'), /CONFORMANCE_CONTROL is not set/);
});
