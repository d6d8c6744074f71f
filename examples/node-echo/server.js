// node-echo is the smallest dedi game server in Node.js, the twin of
// examples/echo: a UDP echo. It listens on $DEDI_PORT_GAME, sends every
// datagram back to its sender, and talks to its LSPM through the Node SDK:
// ready once the socket is bound, then heartbeats carrying the number of
// distinct clients heard from in the last 30 seconds as its player count.
//
// It exits 0 on SIGTERM or SIGINT (after telling the LSPM it shuts down),
// and when the LSPM reports its process as ended.
//
// Run it under an LSPM that allows node:
//
//   dedi lspm ... --allow "$(command -v node)" -- "$(command -v node)" "$PWD/examples/node-echo/server.js"
//
// It imports the SDK by relative path, so it runs from this repository with
// no `npm install`. A game of your own would `npm install` the SDK
// (sdk/node) and `import { fromEnv } from '@dedi/sdk'`.

import dgram from 'node:dgram';
import { once } from 'node:events';
import { fromEnv, isTerminal } from '../../sdk/node/index.js';

// How recently a client must have sent a datagram to count as a player.
const PLAYER_WINDOW_MS = 30_000;

const log = (/** @type {string} */ msg) => console.log(`node-echo: ${msg}`);
const fail = (/** @type {string} */ msg) => console.error(`node-echo: ${msg}`);

process.exitCode = await main();

/** @returns {Promise<number>} */
async function main() {
  const rawPort = process.env.DEDI_PORT_GAME ?? '';
  const port = /^[0-9]{1,5}$/.test(rawPort) ? Number(rawPort) : 0;
  if (port < 1 || port > 65535) {
    fail(`DEDI_PORT_GAME must be a port number, got ${JSON.stringify(rawPort)}`);
    return 2;
  }

  /** @type {(reason: string, announce: boolean) => void} */
  let stop = () => {};
  const stopped = new Promise((resolve) => {
    let once = false;
    stop = (reason, announce) => {
      if (!once) {
        once = true;
        resolve({ reason, announce });
      }
    };
  });
  const stopping = new AbortController(); // aborts a ready still in progress
  const onSignal = () => {
    stopping.abort();
    stop('signal', true);
  };
  process.once('SIGTERM', onSignal);
  process.once('SIGINT', onSignal);

  let dedi;
  try {
    dedi = fromEnv({
      logger: { info: (m, f) => console.error(m, JSON.stringify(f)), warn: (m, f) => console.error(m, JSON.stringify(f)) },
      onState: (p) => {
        if (isTerminal(p.state)) {
          stop(`lspm reports process ${p.state}`, false);
        }
      },
    });
  } catch (err) {
    fail(/** @type {Error} */ (err).message);
    return 2;
  }

  // A machine may have several addresses (dedi's local machines are
  // 127.0.0.N) and node:dgram cannot answer from the address a datagram
  // came to, so on a loopback machine address bind that address: a client
  // that connected its socket would drop a reply from another one.
  // Anywhere else (a VM behind NAT, say) bind every address.
  let host = '0.0.0.0';
  try {
    const me = await dedi.process({ signal: AbortSignal.timeout(2000) });
    if (/^127\.\d+\.\d+\.\d+$/.test(me.address)) {
      host = me.address;
    }
  } catch {
    // The LSPM is restarting: every address it is.
  }

  const socket = dgram.createSocket('udp4');
  /** @type {Map<string, number>} client address -> last heard (ms) */
  const seen = new Map();
  dedi.setPlayers(0);
  socket.on('message', (msg, rinfo) => {
    socket.send(msg, rinfo.port, rinfo.address); // a lost echo is a lost datagram
    const who = `${rinfo.address}:${rinfo.port}`;
    const fresh = !seen.has(who);
    seen.set(who, Date.now());
    if (fresh) {
      dedi.setPlayers(seen.size);
    }
  });
  const prune = setInterval(() => {
    const now = Date.now();
    for (const [who, at] of seen) {
      if (now - at > PLAYER_WINDOW_MS) seen.delete(who);
    }
    dedi.setPlayers(seen.size);
  }, 1000);
  const closeSocket = async () => {
    log('closing socket');
    clearInterval(prune);
    socket.close();
    await once(socket, 'close');
  };

  try {
    socket.bind(port, host);
    await once(socket, 'listening'); // rejects with the socket's error
  } catch (err) {
    fail(`bind ${host}:${port}: ${/** @type {Error} */ (err).message}`);
    clearInterval(prune);
    await dedi.close();
    return 1;
  }

  try {
    await dedi.ready({ signal: stopping.signal });
  } catch (err) {
    await closeSocket();
    await dedi.close();
    if (stopping.signal.aborted) {
      log('signal before ready; shutting down');
      return 0;
    }
    fail(`ready: ${/** @type {Error} */ (err).message}`);
    return 1;
  }
  log(`ready on udp ${host}:${port}`);
  dedi.start();

  const { reason, announce } = await /** @type {Promise<{ reason: string, announce: boolean }>} */ (stopped);
  log(`${reason}; shutting down`);
  if (announce) {
    // Best effort: the LSPM sees the exit anyway.
    await dedi.shutdown({ signal: AbortSignal.timeout(2000) }).catch(() => {});
  }
  await closeSocket();
  await dedi.close();
  log('bye');
  return 0;
}
