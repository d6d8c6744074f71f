// The Agones gRPC driver of dedi's SDK conformance sequence
// (test/e2e/conformance_test.go), written against the official Agones
// Node.js SDK, @google-cloud/agones-sdk, as a studio's game would be:
//
//   node test/agones-node/conformance-driver.mjs
//
// spawned by an LSPM with "sdk": "agones" and CONFORMANCE_CONTROL in its
// environment. It calls ready, then every 100 ms reads the control file
// ({"players": N, "shutdown": false}), pings health and makes the alpha
// player tracking hold player-0 .. player-(N-1). A failed call (the LSPM
// being restarted) is logged to stderr and the SDK is opened afresh on the
// next tick. When shutdown is true it calls shutdown and exits 0.
// Milestones on stdout: "conformance: ready", "conformance: shutdown".

import { openSDK, readControl, sleep } from './common.mjs';

const TICK_MS = 100;
const control = process.env.CONFORMANCE_CONTROL;
if (!control) {
  console.error('conformance-driver: CONFORMANCE_CONTROL is not set');
  process.exit(2);
}

let sdk;
async function reopen() {
  if (sdk) {
    try { sdk.close(); } catch { /* already closed */ }
  }
  sdk = undefined;
  sdk = await openSDK();
}

async function players(n) {
  const want = new Set(Array.from({ length: n }, (_, i) => `player-${i}`));
  const have = await sdk.alpha.getConnectedPlayers();
  for (const id of have) {
    if (!want.has(id)) await sdk.alpha.playerDisconnect(id);
  }
  for (const id of want) {
    if (!have.includes(id)) await sdk.alpha.playerConnect(id);
  }
}

// Ready, retried until the LSPM answers.
for (;;) {
  try {
    if (!sdk) await reopen();
    await sdk.ready();
    break;
  } catch (err) {
    console.error('conformance-driver: ready:', err.message);
    sdk = undefined;
    await sleep(TICK_MS);
  }
}
console.log('conformance: ready');

let ctl = { players: 0, shutdown: false };
for (;;) {
  await sleep(TICK_MS);
  ctl = await readControl(control, ctl);
  try {
    if (!sdk) await reopen();
    if (ctl.shutdown) {
      await sdk.shutdown();
      console.log('conformance: shutdown');
      sdk.close();
      process.exit(0);
    }
    sdk.health((err) => console.error('conformance-driver: health:', err.message));
    await players(ctl.players);
  } catch (err) {
    console.error('conformance-driver:', err.message);
    if (sdk) {
      try { sdk.close(); } catch { /* already closed */ }
    }
    sdk = undefined;
  }
}
