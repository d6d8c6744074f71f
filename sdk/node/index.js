// @ts-check
/**
 * dedi's Node.js SDK: what a game server process uses to talk to the LSPM
 * that started it, over the REST endpoints of shared/API.md (ready,
 * heartbeat, shutdown, and reading its own process object). It is the Go
 * SDK (sdk/go) for Node.js: the same verbs, the same environment variables.
 * It has no dependencies: Node 20's global fetch does the HTTP.
 *
 * A typical game server:
 *
 *     import { fromEnv } from '@dedi/sdk';
 *     const dedi = fromEnv();              // DEDI_* environment set by the LSPM
 *     // ... open the game port: dedi.port('game')
 *     await dedi.ready();                  // starting -> ready (retries while the LSPM restarts)
 *     dedi.start();                        // heartbeat every period in the background
 *     dedi.setPlayers(n);                  // carried by the next heartbeat
 *     // on SIGTERM:
 *     await dedi.shutdown({ signal: AbortSignal.timeout(2000) });
 *     await dedi.close();                  // stops the heartbeat loop
 *
 * @module @dedi/sdk
 */

/** Default period of the heartbeat loop, in milliseconds. */
export const DEFAULT_HEARTBEAT_MS = 2000;
/** Default bound of one HTTP request, in milliseconds. */
export const DEFAULT_REQUEST_TIMEOUT_MS = 5000;

// Backoff bounds of ready and shutdown retries.
const MIN_BACKOFF_MS = 50;
const MAX_BACKOFF_MS = 500;
// How much of an answer the client reads.
const MAX_BODY = 1 << 20;

/**
 * The environment variables an LSPM gives a game server process
 * (API.md, "What a game server process receives").
 */
export const ENV = Object.freeze({
  PROCESS_ID: 'DEDI_PROCESS_ID',
  PROCESS_TOKEN: 'DEDI_PROCESS_TOKEN',
  SDK_URL: 'DEDI_SDK_URL',
  PARAMS: 'DEDI_PARAMS',
  MACHINE_ID: 'DEDI_MACHINE_ID',
  FLEET: 'DEDI_FLEET',
  PORT_PREFIX: 'DEDI_PORT_',
  HEARTBEAT_MS: 'DEDI_HEARTBEAT_MS',
});

/**
 * A process state of API.md.
 * @typedef {'starting' | 'ready' | 'allocated' | 'exited' | 'crashed' | 'unhealthy' | 'killed' | 'lost'} ProcessState
 */

/**
 * The process states of API.md that are final.
 * @type {readonly ProcessState[]}
 */
export const TERMINAL_STATES = Object.freeze(['exited', 'crashed', 'unhealthy', 'killed', 'lost']);

/**
 * isTerminal reports whether a process state is final.
 * @param {string} state
 * @returns {boolean}
 */
export function isTerminal(state) {
  return /** @type {readonly string[]} */ (TERMINAL_STATES).includes(state);
}

// ---------------------------------------------------------------- types

/**
 * @typedef {object} Health
 * @property {number} [periodSeconds]
 * @property {number} [failureThreshold]
 * @property {number} [startTimeoutSeconds]
 */

/**
 * @typedef {object} Exit
 * @property {number | null} code
 * @property {string} [signal]
 * @property {string} reason
 * @property {string} [detail]
 * @property {string[]} logTail
 */

/**
 * The process object of API.md, as the LSPM answers it.
 * @typedef {object} Process
 * @property {string} id
 * @property {string} [fleet]
 * @property {string} machineId
 * @property {string} state
 * @property {number} pid
 * @property {string[]} command
 * @property {Record<string, unknown>} params
 * @property {Record<string, string>} labels
 * @property {string} address
 * @property {Record<string, number>} ports
 * @property {number} players
 * @property {number} [instances]
 * @property {string} [sdk]
 * @property {Health} [health]
 * @property {string} createdAt
 * @property {string | null} readyAt
 * @property {string | null} lastHeartbeatAt
 * @property {string | null} endedAt
 * @property {Exit | null} exit
 */

/**
 * Where the client reports its heartbeat loop's failures and recoveries;
 * `console` fits.
 * @typedef {object} Logger
 * @property {(message: string, fields?: Record<string, unknown>) => void} [info]
 * @property {(message: string, fields?: Record<string, unknown>) => void} [warn]
 */

/**
 * The configuration of a Client. configFromEnv builds one from the
 * environment the LSPM gives a process; tests build it by hand.
 * @typedef {object} Config
 * @property {string} processId  the process's id (required)
 * @property {string} token      its process token (required)
 * @property {string} url        the LSPM's base URL, e.g. http://127.0.0.1:7701 (required)
 * @property {Record<string, unknown>} [params]  the spawn's params
 * @property {string} [machineId]
 * @property {string} [fleet]
 * @property {Record<string, number>} [ports]  allocated ports by lower-case name ("game")
 * @property {number} [heartbeatMs]       period of the heartbeat loop; default 2000
 * @property {number} [requestTimeoutMs]  bound of one HTTP request; default 5000
 * @property {Logger} [logger]  receives the heartbeat loop's failures and recoveries; default none
 * @property {(process: Process) => void} [onState]  called with the process each time an
 *   answer carries a state different from the last known one; must not throw
 */

/**
 * Options of the calls that talk to the LSPM.
 * @typedef {object} CallOptions
 * @property {AbortSignal} [signal]  ends the call (and its retries) early
 */

// ---------------------------------------------------------------- errors

/** DediError is the base class of every error the SDK raises. */
export class DediError extends Error {
  /**
   * @param {string} message
   * @param {{ cause?: unknown, operation?: string }} [options]
   */
  constructor(message, options = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'DediError';
    /** The SDK call that failed: "ready", "heartbeat", "shutdown", "process", or "config". */
    this.operation = options.operation ?? '';
  }

  /** Whether repeating the call may succeed (the LSPM was unreachable or answered 5xx). */
  get retryable() {
    return false;
  }
}

/**
 * ProblemError is an error answer of the LSPM: an RFC 9457 problem
 * document. Its `code` is the contract's stable word (`unauthorized`,
 * `forbidden`, `invalid`, `not_found`, ...) to switch on.
 */
export class ProblemError extends DediError {
  /**
   * @param {string} operation
   * @param {{ type?: string, title?: string, status: number, detail?: string, code: string }} problem
   */
  constructor(operation, problem) {
    super(`dedi sdk ${operation}: ${problem.status} ${problem.code}: ${problem.detail || problem.title || ''}`, { operation });
    this.name = 'ProblemError';
    /** The HTTP status. */
    this.status = problem.status;
    /** The problem's stable code. */
    this.code = problem.code;
    this.title = problem.title ?? '';
    this.detail = problem.detail ?? '';
    this.type = problem.type ?? 'about:blank';
  }

  get retryable() {
    return this.status >= 500;
  }
}

/** ConnectionError says the LSPM could not be reached or did not answer in time. */
export class ConnectionError extends DediError {
  /**
   * @param {string} operation
   * @param {string} reason
   * @param {unknown} [cause]
   */
  constructor(operation, reason, cause) {
    super(`dedi sdk ${operation}: ${reason}`, { operation, cause });
    this.name = 'ConnectionError';
  }

  get retryable() {
    return true;
  }
}

/**
 * AbortError is raised when the caller's AbortSignal ends a call. Its
 * `cause` is the signal's reason and `lastError` the failure that was
 * being retried, if any.
 */
export class AbortError extends DediError {
  /**
   * @param {string} operation
   * @param {AbortSignal} signal
   * @param {DediError} [lastError]
   */
  constructor(operation, signal, lastError) {
    super(`dedi sdk ${operation}: aborted${lastError ? ` (last error: ${lastError.message})` : ''}`, {
      operation,
      cause: signal.reason,
    });
    this.name = 'AbortError';
    /** @type {'ABORT_ERR'} */
    this.code = 'ABORT_ERR';
    /** @type {DediError | undefined} */
    this.lastError = lastError;
  }
}

/** ClosedError is raised by a call on, or interrupted by, a closed Client. */
export class ClosedError extends DediError {
  /** @param {string} operation */
  constructor(operation) {
    super(`dedi sdk ${operation}: client closed`, { operation });
    this.name = 'ClosedError';
  }
}

/** ConfigError says the configuration or the environment is unusable. */
export class ConfigError extends DediError {
  /** @param {string} message */
  constructor(message) {
    super(`dedi sdk: ${message}`, { operation: 'config' });
    this.name = 'ConfigError';
  }
}

// ---------------------------------------------------------------- config

/**
 * validateConfig throws a ConfigError for a missing or malformed field.
 * @param {Config} cfg
 */
export function validateConfig(cfg) {
  if (cfg === null || typeof cfg !== 'object') {
    throw new ConfigError('config: not an object');
  }
  const missing = /** @type {const} */ (['processId', 'token', 'url']).filter((k) => typeof cfg[k] !== 'string' || cfg[k] === '');
  if (missing.length > 0) {
    throw new ConfigError(`config: missing ${missing.join(', ')}`);
  }
  let u;
  try {
    u = new URL(cfg.url);
  } catch {
    u = null;
  }
  if (!u || (u.protocol !== 'http:' && u.protocol !== 'https:') || u.host === '') {
    throw new ConfigError(`config: url ${JSON.stringify(cfg.url)} is not an http(s) base URL`);
  }
  for (const k of /** @type {const} */ (['heartbeatMs', 'requestTimeoutMs'])) {
    const v = cfg[k];
    if (v !== undefined && !(typeof v === 'number' && Number.isFinite(v) && v >= 0)) {
      throw new ConfigError(`config: ${k} must be a non-negative number of milliseconds`);
    }
  }
  if (cfg.onState !== undefined && typeof cfg.onState !== 'function') {
    throw new ConfigError('config: onState must be a function');
  }
}

/**
 * configFromEnv reads the environment an LSPM gives a game server process:
 * DEDI_PROCESS_ID, DEDI_PROCESS_TOKEN and DEDI_SDK_URL are required;
 * DEDI_PARAMS (a JSON object), DEDI_MACHINE_ID, DEDI_FLEET,
 * DEDI_PORT_<NAME> and DEDI_HEARTBEAT_MS (milliseconds, default 2000) are
 * optional. It throws a ConfigError when the environment is unusable.
 * @param {Record<string, string | undefined>} [env]  default process.env
 * @returns {Config}
 */
export function configFromEnv(env = process.env) {
  const missing = [ENV.PROCESS_ID, ENV.PROCESS_TOKEN, ENV.SDK_URL].filter((k) => !env[k]);
  if (missing.length > 0) {
    throw new ConfigError(
      `missing environment variable ${missing.join(', ')} (is this process started by a dedi LSPM?)`,
    );
  }
  /** @type {Config} */
  const cfg = {
    processId: /** @type {string} */ (env[ENV.PROCESS_ID]),
    token: /** @type {string} */ (env[ENV.PROCESS_TOKEN]),
    url: /** @type {string} */ (env[ENV.SDK_URL]),
    machineId: env[ENV.MACHINE_ID] ?? '',
    fleet: env[ENV.FLEET] ?? '',
    params: {},
    ports: {},
  };
  const rawParams = env[ENV.PARAMS];
  if (rawParams) {
    let v;
    try {
      v = JSON.parse(rawParams);
    } catch (err) {
      throw new ConfigError(`${ENV.PARAMS} is not a JSON object: ${/** @type {Error} */ (err).message}`);
    }
    if (v !== null && (typeof v !== 'object' || Array.isArray(v))) {
      throw new ConfigError(`${ENV.PARAMS} is not a JSON object`);
    }
    cfg.params = v ?? {}; // the JSON literal null means none
  }
  const ports = /** @type {Record<string, number>} */ ({});
  for (const [k, v] of Object.entries(env)) {
    if (!k.startsWith(ENV.PORT_PREFIX) || k.length === ENV.PORT_PREFIX.length || v === undefined) {
      continue;
    }
    const port = /^[0-9]{1,5}$/.test(v) ? Number(v) : NaN;
    if (!(port >= 1 && port <= 65535)) {
      throw new ConfigError(`${k}=${JSON.stringify(v)} is not a port`);
    }
    ports[k.slice(ENV.PORT_PREFIX.length).toLowerCase()] = port;
  }
  cfg.ports = ports;
  const hb = env[ENV.HEARTBEAT_MS];
  if (hb) {
    const ms = /^[0-9]{1,9}$/.test(hb) ? Number(hb) : NaN;
    if (!(ms > 0)) {
      throw new ConfigError(`${ENV.HEARTBEAT_MS}=${JSON.stringify(hb)} is not a positive number of milliseconds`);
    }
    cfg.heartbeatMs = ms;
  }
  validateConfig(cfg);
  return cfg;
}

/**
 * fromEnv returns a Client configured from the environment (configFromEnv);
 * options add to or replace what the environment says (logger, onState,
 * heartbeatMs, requestTimeoutMs). `options.env` replaces process.env.
 * @param {Partial<Config> & { env?: Record<string, string | undefined> }} [options]
 * @returns {Client}
 */
export function fromEnv(options = {}) {
  const { env, ...rest } = options;
  const cfg = configFromEnv(env);
  for (const [k, v] of Object.entries(rest)) {
    if (v !== undefined) {
      /** @type {Record<string, unknown>} */ (cfg)[k] = v;
    }
  }
  return new Client(cfg);
}

// ---------------------------------------------------------------- client

/**
 * Client talks to the process's LSPM. It holds at most one background
 * heartbeat loop (start); close stops it and waits for it.
 */
export class Client {
  /** @type {Required<Omit<Config, 'logger' | 'onState'>> & Pick<Config, 'logger' | 'onState'>} */
  #cfg;
  /** URL of this process: <url>/v1/processes/<id> */
  #base;
  /** @type {number | undefined} */
  #players;
  /** @type {number | undefined} */
  #instances;
  #state = '';
  #started = false;
  #closed = false;
  #closing = new AbortController();
  /** @type {Set<Promise<void>>} running heartbeat loops */
  #loops = new Set();

  /**
   * new Client returns a client for cfg. It does no I/O; it throws a
   * ConfigError for a bad cfg.
   * @param {Config} cfg
   */
  constructor(cfg) {
    validateConfig(cfg);
    this.#cfg = {
      processId: cfg.processId,
      token: cfg.token,
      url: cfg.url,
      params: structuredClone(cfg.params ?? {}),
      machineId: cfg.machineId ?? '',
      fleet: cfg.fleet ?? '',
      ports: { ...(cfg.ports ?? {}) },
      heartbeatMs: cfg.heartbeatMs || DEFAULT_HEARTBEAT_MS,
      requestTimeoutMs: cfg.requestTimeoutMs || DEFAULT_REQUEST_TIMEOUT_MS,
      logger: cfg.logger,
      onState: cfg.onState,
    };
    this.#base = `${cfg.url.replace(/\/+$/, '')}/v1/processes/${encodeURIComponent(cfg.processId)}`;
  }

  /** The process's id. */
  get id() {
    return this.#cfg.processId;
  }

  /** The id of the machine the process runs on ("" if unknown). */
  get machineId() {
    return this.#cfg.machineId;
  }

  /** The process's fleet ("" if none). */
  get fleet() {
    return this.#cfg.fleet;
  }

  /** A copy of the spawn's params (never null). */
  get params() {
    return structuredClone(this.#cfg.params);
  }

  /** A copy of the allocated ports by lower-case name. */
  get ports() {
    return { ...this.#cfg.ports };
  }

  /**
   * port returns the allocated port of that name ("game"),
   * case-insensitively, or undefined.
   * @param {string} name
   * @returns {number | undefined}
   */
  port(name) {
    return this.#cfg.ports[name.toLowerCase()];
  }

  /** The period of the heartbeat loop in milliseconds. */
  get heartbeatMs() {
    return this.#cfg.heartbeatMs;
  }

  /** The last process state an answer of the LSPM carried, "" before the first one. */
  get state() {
    return this.#state;
  }

  /** Whether close was called. */
  get closed() {
    return this.#closed;
  }

  /**
   * setPlayers sets the player count that the next heartbeats carry.
   * @param {number} n  a non-negative integer
   */
  setPlayers(n) {
    this.#players = count(n, 'players');
  }

  /**
   * setInstances sets the game instance count that the next heartbeats carry.
   * @param {number} n  a non-negative integer
   */
  setInstances(n) {
    this.#instances = count(n, 'instances');
  }

  /**
   * ready tells the LSPM that the process is ready for players
   * (starting -> ready) and returns the process. It retries with backoff
   * on connection errors and 5xx answers until the signal aborts or the
   * client closes, so it rides out an LSPM that is restarting. Any other
   * error answer rejects at once with a ProblemError.
   * @param {CallOptions} [options]
   * @returns {Promise<Process>}
   */
  async ready(options = {}) {
    return /** @type {Promise<Process>} */ (this.#retry('ready', 'POST', '/ready', options.signal));
  }

  /**
   * shutdown announces that the process is ending; it must then exit
   * within the LSPM's grace period. It retries like ready. It resolves to
   * the process, or null when the LSPM answers without a body.
   * @param {CallOptions} [options]
   * @returns {Promise<Process | null>}
   */
  async shutdown(options = {}) {
    return this.#retry('shutdown', 'POST', '/shutdown', options.signal);
  }

  /**
   * heartbeat sends one heartbeat carrying the player and instance counts
   * last set (those never set are left out) and returns the process. It
   * does not retry.
   * @param {CallOptions} [options]
   * @returns {Promise<Process>}
   */
  async heartbeat(options = {}) {
    /** @type {{ players?: number, instances?: number }} */
    const body = {};
    if (this.#players !== undefined) body.players = this.#players;
    if (this.#instances !== undefined) body.instances = this.#instances;
    return /** @type {Promise<Process>} */ (this.#once('heartbeat', 'POST', '/heartbeat', body, options.signal));
  }

  /**
   * process reads the process object (GET /v1/processes/{id}). It does not
   * retry.
   * @param {CallOptions} [options]
   * @returns {Promise<Process>}
   */
  async process(options = {}) {
    return /** @type {Promise<Process>} */ (this.#once('process', 'GET', '', undefined, options.signal));
  }

  /**
   * start runs the heartbeat loop (see run) in the background until close
   * or the signal aborts. Calls after the first, or after close, do
   * nothing.
   * @param {CallOptions} [options]
   */
  start(options = {}) {
    if (this.#started || this.#closed) {
      return;
    }
    this.#started = true;
    this.#loop(options.signal).catch(() => {}); // an abort is how it ends
  }

  /**
   * run sends a heartbeat now and then every heartbeat period until close
   * (it then resolves) or the signal aborts (it then rejects with an
   * AbortError); on a closed client it rejects with a ClosedError at once.
   * Failures (an LSPM restarting, a refused connection, an error answer)
   * do not stop it: it logs the first failure and the recovery and keeps
   * going. close waits for run to end.
   * @param {CallOptions} [options]
   * @returns {Promise<void>}
   */
  async run(options = {}) {
    if (this.#closed) {
      throw new ClosedError('heartbeat loop');
    }
    return this.#loop(options.signal);
  }

  /**
   * close stops the heartbeat loop and waits for it to end; calls in
   * progress reject with a ClosedError. It is safe to call more than once.
   * It does not tell the LSPM anything: call shutdown for that.
   * @returns {Promise<void>}
   */
  async close() {
    this.#closed = true;
    this.#closing.abort();
    await Promise.allSettled([...this.#loops]);
  }

  /**
   * @param {AbortSignal | undefined} signal
   * @returns {Promise<void>}
   */
  #loop(signal) {
    const done = (async () => {
      let failures = 0;
      let next = Date.now();
      while (!this.#closed && !signal?.aborted) {
        try {
          await this.heartbeat({ signal });
          if (failures > 0) {
            this.#log('info', 'heartbeat recovered', { failures });
            failures = 0;
          }
        } catch (err) {
          if (this.#closed || signal?.aborted) {
            break;
          }
          if (failures === 0) {
            this.#log('warn', 'heartbeat failed; retrying every period', { err: /** @type {Error} */ (err).message });
          }
          failures++;
        }
        next += this.#cfg.heartbeatMs;
        const now = Date.now();
        if (next < now) {
          next = now; // a slow beat: the next one goes now, missed ones are dropped
        }
        await sleep(next - now, signal, this.#closing.signal);
      }
      if (this.#closed) {
        return;
      }
      throw new AbortError('heartbeat loop', /** @type {AbortSignal} */ (signal));
    })();
    this.#loops.add(done);
    const forget = () => this.#loops.delete(done);
    done.then(forget, forget);
    return done;
  }

  /**
   * #retry repeats #once with backoff while its failure is retryable.
   * @param {string} op
   * @param {string} method
   * @param {string} suffix
   * @param {AbortSignal | undefined} signal
   * @returns {Promise<Process | null>}
   */
  async #retry(op, method, suffix, signal) {
    let delay = MIN_BACKOFF_MS;
    for (;;) {
      /** @type {DediError} */
      let last;
      try {
        return await this.#once(op, method, suffix, undefined, signal);
      } catch (err) {
        if (!(err instanceof DediError) || !err.retryable) {
          throw err;
        }
        last = err;
      }
      if (!(await sleep(delay, signal, this.#closing.signal))) {
        if (signal?.aborted) {
          throw new AbortError(op, signal, last);
        }
        throw new ClosedError(op);
      }
      delay = Math.min(2 * delay, MAX_BACKOFF_MS);
    }
  }

  /**
   * #once makes one request to the process's URL plus suffix and decodes
   * a process from a 2xx answer.
   * @param {string} op
   * @param {string} method
   * @param {string} suffix
   * @param {object | undefined} body
   * @param {AbortSignal | undefined} signal
   * @returns {Promise<Process | null>}
   */
  async #once(op, method, suffix, body, signal) {
    if (this.#closed) {
      throw new ClosedError(op);
    }
    if (signal?.aborted) {
      throw new AbortError(op, signal);
    }
    // One controller per request, tied to the caller's signal, close and
    // the request timeout; the listeners go when the request does, so a
    // long-lived signal gathers none.
    const ctl = new AbortController();
    const abort = () => ctl.abort();
    signal?.addEventListener('abort', abort, { once: true });
    this.#closing.signal.addEventListener('abort', abort, { once: true });
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      ctl.abort();
    }, this.#cfg.requestTimeoutMs);
    /** @type {Record<string, string>} */
    const headers = { Authorization: `Bearer ${this.#cfg.token}`, Accept: 'application/json' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
    }
    let status;
    let text;
    try {
      const res = await fetch(this.#base + suffix, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: ctl.signal,
        redirect: 'manual',
      });
      status = res.status;
      text = await readBody(res);
    } catch (err) {
      if (signal?.aborted) {
        throw new AbortError(op, signal);
      }
      if (this.#closed) {
        throw new ClosedError(op);
      }
      if (timedOut) {
        throw new ConnectionError(op, `no answer within ${this.#cfg.requestTimeoutMs} ms`, err);
      }
      throw new ConnectionError(op, describe(err), err);
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener('abort', abort);
      this.#closing.signal.removeEventListener('abort', abort);
    }
    if (status < 200 || status > 299) {
      throw problemOf(op, status, text);
    }
    if (text.trim() === '') {
      return null;
    }
    let p;
    try {
      p = JSON.parse(text);
    } catch (err) {
      throw new DediError(`dedi sdk ${op}: decode answer: ${/** @type {Error} */ (err).message}`, { operation: op, cause: err });
    }
    if (p === null || typeof p !== 'object' || Array.isArray(p)) {
      throw new DediError(`dedi sdk ${op}: decode answer: not a process object`, { operation: op });
    }
    this.#observe(p);
    return p;
  }

  /**
   * #observe remembers p's state and calls onState when it changed.
   * @param {Process} p
   */
  #observe(p) {
    if (typeof p.state !== 'string' || p.state === '' || p.state === this.#state) {
      return;
    }
    this.#state = p.state;
    if (this.#cfg.onState) {
      try {
        this.#cfg.onState(p);
      } catch (err) {
        this.#log('warn', 'onState threw', { err: /** @type {Error} */ (err).message });
      }
    }
  }

  /**
   * @param {'info' | 'warn'} level
   * @param {string} message
   * @param {Record<string, unknown>} fields
   */
  #log(level, message, fields) {
    const fn = this.#cfg.logger?.[level];
    if (typeof fn === 'function') {
      try {
        fn.call(this.#cfg.logger, `dedi sdk: ${message}`, { process: this.#cfg.processId, ...fields });
      } catch {
        // A broken logger must not break the heartbeat loop.
      }
    }
  }
}

// ---------------------------------------------------------------- helpers

/**
 * count checks a player or instance count.
 * @param {number} n
 * @param {string} what
 * @returns {number}
 */
function count(n, what) {
  if (!Number.isSafeInteger(n) || n < 0) {
    throw new RangeError(`dedi sdk: ${what} must be a non-negative integer, got ${n}`);
  }
  return n;
}

/**
 * sleep waits ms milliseconds; it resolves true after them, false as soon
 * as one of the signals aborts.
 * @param {number} ms
 * @param {...(AbortSignal | undefined)} signals
 * @returns {Promise<boolean>}
 */
function sleep(ms, ...signals) {
  const live = /** @type {AbortSignal[]} */ (signals.filter(Boolean));
  if (live.some((s) => s.aborted)) {
    return Promise.resolve(false);
  }
  return new Promise((resolve) => {
    const finish = (/** @type {boolean} */ ok) => {
      clearTimeout(timer);
      for (const s of live) s.removeEventListener('abort', onAbort);
      resolve(ok);
    };
    const onAbort = () => finish(false);
    const timer = setTimeout(() => finish(true), ms);
    for (const s of live) s.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * readBody reads at most MAX_BODY bytes of an answer as text.
 * @param {Response} res
 * @returns {Promise<string>}
 */
async function readBody(res) {
  if (!res.body) {
    return '';
  }
  /** @type {Uint8Array[]} */
  const chunks = [];
  let n = 0;
  for await (const chunk of res.body) {
    const room = MAX_BODY - n;
    chunks.push(chunk.byteLength > room ? chunk.subarray(0, room) : chunk);
    n += Math.min(chunk.byteLength, room);
    if (n >= MAX_BODY) {
      break; // cancels the rest
    }
  }
  return Buffer.concat(chunks).toString('utf8');
}

/**
 * describe names a fetch failure by its root cause ("connect
 * ECONNREFUSED 127.0.0.1:7701") rather than undici's "fetch failed".
 * @param {unknown} err
 * @returns {string}
 */
function describe(err) {
  let e = /** @type {any} */ (err);
  for (let i = 0; i < 4 && e?.cause instanceof Error; i++) {
    e = e.cause;
  }
  return e instanceof Error ? e.message : String(err);
}

/**
 * problemOf decodes an error answer; a body that is not a problem document
 * becomes one built from the status.
 * @param {string} op
 * @param {number} status
 * @param {string} text
 * @returns {ProblemError}
 */
function problemOf(op, status, text) {
  try {
    const p = JSON.parse(text);
    if (p && typeof p === 'object' && typeof p.code === 'string' && p.code !== '') {
      return new ProblemError(op, {
        type: typeof p.type === 'string' ? p.type : undefined,
        title: typeof p.title === 'string' ? p.title : undefined,
        status: typeof p.status === 'number' && p.status !== 0 ? p.status : status,
        detail: typeof p.detail === 'string' ? p.detail : undefined,
        code: p.code,
      });
    }
  } catch {
    // not JSON: built from the status below
  }
  return new ProblemError(op, {
    type: 'about:blank',
    title: STATUS_TEXT[status] ?? '',
    status,
    detail: text.slice(0, 200).trim(),
    code: codeOf(status),
  });
}

/** @type {Record<number, string>} */
const STATUS_TEXT = {
  400: 'Bad Request',
  401: 'Unauthorized',
  403: 'Forbidden',
  404: 'Not Found',
  405: 'Method Not Allowed',
  413: 'Request Entity Too Large',
  415: 'Unsupported Media Type',
  500: 'Internal Server Error',
  502: 'Bad Gateway',
  503: 'Service Unavailable',
  504: 'Gateway Timeout',
};

/**
 * codeOf maps a status to the contract's problem code for answers that
 * carry none (e.g. from a proxy).
 * @param {number} status
 * @returns {string}
 */
function codeOf(status) {
  switch (status) {
    case 400:
      return 'invalid';
    case 401:
      return 'unauthorized';
    case 403:
      return 'forbidden';
    case 404:
      return 'not_found';
    case 405:
      return 'method_not_allowed';
    case 413:
      return 'too_large';
    case 415:
      return 'unsupported_media_type';
    case 504:
      return 'timeout';
  }
  return status >= 500 ? 'internal' : `http_${status}`;
}
