// The Node SDK's parts that need no LSPM: reading the environment, and the
// answers a real LSPM does not give on demand (a 503 while it starts, a
// proxy's plain-text error, a hung server, a huge body), served by a
// node:http server on 127.0.0.252 with a port the kernel picks.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { once } from 'node:events';
import {
  Client,
  ConfigError,
  ConnectionError,
  DediError,
  ProblemError,
  configFromEnv,
  fromEnv,
  isTerminal,
  validateConfig,
} from '../index.js';

const base = { DEDI_PROCESS_ID: 'p-1', DEDI_PROCESS_TOKEN: 'tok', DEDI_SDK_URL: 'http://127.0.0.1:7701' };

test('configFromEnv: what it reads and what it refuses', () => {
  const cfg = configFromEnv({
    ...base, DEDI_PARAMS: '{"map":"arena"}', DEDI_MACHINE_ID: 'm-1', DEDI_FLEET: 'demo',
    DEDI_PORT_GAME: '30001', DEDI_PORT_QUERY: '30002', DEDI_HEARTBEAT_MS: '500', OTHER: 'x',
  });
  assert.deepEqual(cfg, {
    processId: 'p-1', token: 'tok', url: 'http://127.0.0.1:7701', machineId: 'm-1', fleet: 'demo',
    params: { map: 'arena' }, ports: { game: 30001, query: 30002 }, heartbeatMs: 500,
  });
  assert.deepEqual(configFromEnv({ ...base, DEDI_PARAMS: 'null' }).params, {});
  assert.deepEqual(configFromEnv(base).params, {});
  assert.equal(configFromEnv(base).heartbeatMs, undefined);

  /** @type {[Record<string, string>, RegExp][]} */
  const refused = [
    [{}, /missing environment variable DEDI_PROCESS_ID, DEDI_PROCESS_TOKEN, DEDI_SDK_URL/],
    [{ ...base, DEDI_PROCESS_TOKEN: '' }, /missing environment variable DEDI_PROCESS_TOKEN \(/],
    [{ ...base, DEDI_PARAMS: '[1]' }, /DEDI_PARAMS is not a JSON object/],
    [{ ...base, DEDI_PARAMS: '"s"' }, /DEDI_PARAMS is not a JSON object/],
    [{ ...base, DEDI_PARAMS: '{' }, /DEDI_PARAMS is not a JSON object/],
    [{ ...base, DEDI_PORT_GAME: '0' }, /DEDI_PORT_GAME="0" is not a port/],
    [{ ...base, DEDI_PORT_GAME: '65536' }, /is not a port/],
    [{ ...base, DEDI_PORT_GAME: '+80' }, /is not a port/],
    [{ ...base, DEDI_HEARTBEAT_MS: '0' }, /DEDI_HEARTBEAT_MS="0" is not a positive/],
    [{ ...base, DEDI_HEARTBEAT_MS: '1.5' }, /is not a positive/],
    [{ ...base, DEDI_SDK_URL: 'ftp://x' }, /is not an http\(s\) base URL/],
    [{ ...base, DEDI_SDK_URL: '127.0.0.1:7701' }, /is not an http\(s\) base URL/],
  ];
  for (const [env, msg] of refused) {
    assert.throws(() => configFromEnv(env), (err) => err instanceof ConfigError && msg.test(err.message), JSON.stringify(env));
  }
  assert.throws(() => fromEnv({ env: {} }), ConfigError);
  assert.throws(() => validateConfig({ processId: 'p', token: 't', url: 'http://x', heartbeatMs: -1 }), ConfigError);
  assert.throws(() => new Client(/** @type {any} */ ({ processId: 'p', url: 'http://x' })), /missing token/);
  assert.ok(isTerminal('crashed') && !isTerminal('ready'));
});

/**
 * serve runs handler on a node:http server for the test's length and returns a client of it.
 * @param {import('node:test').TestContext} t
 * @param {(req: import('node:http').IncomingMessage, res: import('node:http').ServerResponse) => void} handler
 * @param {Partial<import('../index.js').Config>} [extra]
 */
async function serve(t, handler, extra = {}) {
  const srv = createServer(handler);
  srv.listen(0, '127.0.0.252');
  await once(srv, 'listening');
  const addr = /** @type {import('node:net').AddressInfo} */ (srv.address());
  const client = new Client({ processId: 'p-1', token: 'tok', url: `http://127.0.0.252:${addr.port}/`, ...extra });
  t.after(async () => {
    await client.close();
    srv.closeAllConnections();
    srv.close();
  });
  return client;
}

test('ready retries 503 answers, then returns the process', async (t) => {
  let calls = 0;
  const client = await serve(t, (req, res) => {
    assert.equal(req.url, '/v1/processes/p-1/ready');
    assert.equal(req.headers.authorization, 'Bearer tok');
    calls++;
    if (calls < 3) {
      res.writeHead(503, { 'Content-Type': 'application/problem+json', 'Retry-After': '1' });
      res.end(JSON.stringify({ type: 'about:blank', title: 'Service Unavailable', status: 503, code: 'shutting_down' }));
      return;
    }
    res.writeHead(200, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify({ id: 'p-1', state: 'ready' }));
  });
  const p = await client.ready();
  assert.equal(p.state, 'ready');
  assert.equal(calls, 3);
});

test('an error answer without a problem document gets a code from its status', async (t) => {
  const client = await serve(t, (req, res) => {
    const status = req.url?.endsWith('/heartbeat') ? 502 : 404;
    res.writeHead(status, { 'Content-Type': 'text/html' });
    res.end('<html>bad gateway</html>');
  });
  await assert.rejects(client.heartbeat(), (err) => {
    assert.ok(err instanceof ProblemError);
    assert.equal(err.code, 'internal');
    assert.equal(err.status, 502);
    assert.equal(err.retryable, true);
    assert.equal(err.detail, '<html>bad gateway</html>');
    return true;
  });
  await assert.rejects(client.process(), { status: 404, code: 'not_found', retryable: false });
});

test('a server that does not answer is a ConnectionError after the request timeout', async (t) => {
  const client = await serve(t, () => {}, { requestTimeoutMs: 200 });
  const t0 = Date.now();
  await assert.rejects(client.heartbeat(), (err) => {
    assert.ok(err instanceof ConnectionError, String(err));
    assert.match(err.message, /no answer within 200 ms/);
    return true;
  });
  assert.ok(Date.now() - t0 < 2000);
});

test('an answer over 1 MiB is cut and refused; a throwing onState is logged, not fatal', async (t) => {
  /** @type {string[]} */
  const warned = [];
  const client = await serve(
    t,
    (req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/json' });
      if (req.method === 'GET') {
        res.end(JSON.stringify({ id: 'p-1', state: 'ready', pad: 'x'.repeat(2 << 20) }));
        return;
      }
      res.end(JSON.stringify({ id: 'p-1', state: 'ready' }));
    },
    {
      onState: () => {
        throw new Error('callback bug');
      },
      logger: { warn: (msg) => warned.push(msg) },
    },
  );
  await assert.rejects(client.process(), (err) => err instanceof DediError && /decode answer/.test(err.message));
  const p = await client.heartbeat();
  assert.equal(p.state, 'ready');
  assert.deepEqual(warned, ['dedi sdk: onState threw']);
});
