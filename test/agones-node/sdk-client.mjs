// A game server written against the official Agones Node.js SDK
// (@google-cloud/agones-sdk), run by test/e2e/agones_test.go on a dedi
// LSPM. It drives ready, health, setLabel, setAnnotation, getGameServer,
// watchGameServer, alpha player tracking and a beta (counters) call, and
// prints one JSON line per result ("node: {...}"); then it pings health
// until the control file (CONFORMANCE_CONTROL) says shutdown, calls
// shutdown and exits 0.

import { openSDK, readControl, sleep } from './common.mjs';

const print = (what, value) => console.log('node: ' + JSON.stringify({ what, value }));

const sdk = await openSDK();
sdk.watchGameServer(
  (gs) => print('watch', { state: gs.status.state, labels: Object.fromEntries(gs.objectMeta.labelsMap) }),
  (err) => print('watch-error', err.message),
);
await sdk.ready();
print('ready', true);
for (let i = 0; i < 3; i++) {
  sdk.health((err) => print('health-error', err.message));
  await sleep(50);
}
await sdk.setLabel('mode', 'ranked');
await sdk.setAnnotation('note', 'hello from node');
print('connect', await sdk.alpha.playerConnect('p1'));
print('count', await sdk.alpha.getPlayerCount());
const gs = await sdk.getGameServer();
print('gameserver', {
  name: gs.objectMeta.name,
  state: gs.status.state,
  labels: Object.fromEntries(gs.objectMeta.labelsMap),
  annotations: Object.fromEntries(gs.objectMeta.annotationsMap),
  ports: gs.status.portsList,
  players: gs.status.players,
});
try {
  await sdk.beta.getCounterCount('rooms');
  print('beta', 'no error');
} catch (err) {
  print('beta', { code: err.code, message: err.details });
}
print('done', true);

let ctl = { players: 0, shutdown: false };
for (;;) {
  await sleep(100);
  ctl = await readControl(process.env.CONFORMANCE_CONTROL, ctl);
  if (ctl.shutdown) break;
  sdk.health((err) => print('health-error', err.message));
}
await sdk.shutdown();
print('shutdown', true);
sdk.close();
process.exit(0);
