// The Node SDK's driver of the SDK conformance sequence
// (test/e2e/conformance_test.go): a game server the LSPM spawns, steered
// through a control file.
//
//   node sdk/node/test/conformance-driver.mjs
//
// with the LSPM's environment plus CONFORMANCE_CONTROL=/path/control.json.
// At start it calls ready; then every 100 ms it reads the control file
// ({"players": N, "shutdown": false}; a missing or unparsable file keeps the
// previous values) and the SDK's heartbeat loop, also every 100 ms, carries
// N. A failed call (the LSPM is being restarted) is logged to stderr and
// retried; the driver never exits because the LSPM went away. When
// shutdown is true it calls shutdown and exits 0. Milestones go to stdout,
// one line each: "conformance: ready", "conformance: shutdown".
//
// node --test runs every file under test/, this one too: run that way (no
// LSPM environment) it registers one skipped test and does nothing else.
// Its own tests are in driver.test.mjs.

import { readFile } from 'node:fs/promises';
import { setTimeout as delay } from 'node:timers/promises';
import { fromEnv } from '../index.js';

const TICK_MS = 100;

if (process.env.NODE_TEST_CONTEXT && !process.env.DEDI_PROCESS_ID) {
  const { test } = await import('node:test');
  test('conformance-driver.mjs is a game server the LSPM spawns', { skip: 'its tests are in driver.test.mjs' }, () => {});
} else {
  process.exitCode = await main();
}

/** @returns {Promise<number>} */
async function main() {
  const control = process.env.CONFORMANCE_CONTROL;
  if (!control) {
    console.error('conformance-driver: CONFORMANCE_CONTROL is not set');
    return 2;
  }
  /** @type {import('../index.js').Logger} */
  const stderrLogger = {
    info: (msg, fields) => console.error(msg, JSON.stringify(fields)),
    warn: (msg, fields) => console.error(msg, JSON.stringify(fields)),
  };
  let dedi;
  try {
    dedi = fromEnv({ heartbeatMs: TICK_MS, logger: stderrLogger });
  } catch (err) {
    console.error('conformance-driver:', /** @type {Error} */ (err).message);
    return 2;
  }

  // ready retries by itself while the LSPM is unreachable or answers 5xx;
  // a 4xx (a bad token, say) is worth a log line and another try.
  for (;;) {
    try {
      await dedi.ready();
      break;
    } catch (err) {
      console.error('conformance-driver: ready:', /** @type {Error} */ (err).message);
      await delay(TICK_MS);
    }
  }
  console.log('conformance: ready');

  let players = 0;
  dedi.setPlayers(players);
  dedi.start(); // its failures go to stderr through the logger
  for (;;) {
    const c = await readControl(control);
    if (c && typeof c.players === 'number' && Number.isSafeInteger(c.players) && c.players >= 0 && c.players !== players) {
      players = c.players;
      dedi.setPlayers(players);
    }
    if (c?.shutdown === true) {
      break;
    }
    await delay(TICK_MS);
  }
  for (;;) {
    try {
      await dedi.shutdown({ signal: AbortSignal.timeout(10 * TICK_MS) });
      break;
    } catch (err) {
      console.error('conformance-driver: shutdown:', /** @type {Error} */ (err).message);
    }
  }
  await dedi.close();
  console.log('conformance: shutdown');
  return 0;
}

/**
 * readControl reads the control file; null when it is missing or not a
 * JSON object.
 * @param {string} path
 * @returns {Promise<{ players?: unknown, shutdown?: unknown } | null>}
 */
async function readControl(path) {
  try {
    const v = JSON.parse(await readFile(path, 'utf8'));
    return v && typeof v === 'object' && !Array.isArray(v) ? v : null;
  } catch {
    return null;
  }
}
