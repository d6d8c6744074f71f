// A game server using the official Agones Node.js SDK as a studio's game
// does, with nothing added for dedi: it connects, calls ready, and pings
// health every 100 ms on the SDK's one health stream, which the SDK never
// reopens. Run by test/e2e/agones_test.go across an LSPM kill -9 and
// restart. When the control file (CONFORMANCE_CONTROL) says shutdown it
// calls shutdown and exits 0. Milestones: "plain: ready", "plain: shutdown".

import AgonesSDK from '@google-cloud/agones-sdk';
import { readControl, sleep } from './common.mjs';

const sdk = new AgonesSDK();
await sdk.connect();
await sdk.ready();
console.log('plain: ready');
let ctl = { players: 0, shutdown: false };
for (;;) {
  await sleep(100);
  ctl = await readControl(process.env.CONFORMANCE_CONTROL, ctl);
  if (ctl.shutdown) {
    try {
      await sdk.shutdown();
      console.log('plain: shutdown');
      sdk.close();
      process.exit(0);
    } catch (err) {
      console.error('plain: shutdown:', err.message);
      continue;
    }
  }
  sdk.health((err) => console.error('plain: health:', err.message));
}
