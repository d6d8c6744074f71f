// Compiled by ../typecheck.sh only: proves that the hand-written
// index.d.ts and the implementation's JSDoc (declarations generated into
// gen/) describe the same module, and that the d.ts serves a game's code.
import * as hand from '../index.js';
import * as gen from './gen/index.js';

// The implementation's surface fits the hand-written one...
const fits: typeof hand = gen;
// ...and the hand-written one names nothing the implementation lacks.
type Missing = Exclude<keyof typeof hand, keyof typeof gen>;
const none: [Missing] extends [never] ? true : false = true;
void fits;
void none;

// Usage as a game server would write it.
const c = hand.fromEnv({
  logger: console,
  onState: (p) => {
    if (hand.isTerminal(p.state)) console.log(p.exit?.reason);
  },
});
c.setPlayers(1);
const p: hand.Process = await c.ready({ signal: AbortSignal.timeout(1000) });
const s: hand.Process | null = await c.shutdown();
try {
  await c.heartbeat();
} catch (e) {
  if (e instanceof hand.ProblemError) {
    const code: string = e.code;
    const status: number = e.status;
    void code;
    void status;
  }
}
c.start();
await c.run().catch(() => {});
await c.close();
void p;
void s;
