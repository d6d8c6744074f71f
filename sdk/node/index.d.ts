// Types of @dedi/sdk (index.js). Written by hand; keep in step with the
// JSDoc of index.js.

/** Default period of the heartbeat loop, in milliseconds. */
export declare const DEFAULT_HEARTBEAT_MS: 2000;
/** Default bound of one HTTP request, in milliseconds. */
export declare const DEFAULT_REQUEST_TIMEOUT_MS: 5000;

/** The environment variables an LSPM gives a game server process. */
export declare const ENV: Readonly<{
  PROCESS_ID: 'DEDI_PROCESS_ID';
  PROCESS_TOKEN: 'DEDI_PROCESS_TOKEN';
  SDK_URL: 'DEDI_SDK_URL';
  PARAMS: 'DEDI_PARAMS';
  MACHINE_ID: 'DEDI_MACHINE_ID';
  FLEET: 'DEDI_FLEET';
  PORT_PREFIX: 'DEDI_PORT_';
  HEARTBEAT_MS: 'DEDI_HEARTBEAT_MS';
}>;

/** A process state of API.md. */
export type ProcessState =
  | 'starting'
  | 'ready'
  | 'allocated'
  | 'exited'
  | 'crashed'
  | 'unhealthy'
  | 'killed'
  | 'lost';

/** The process states that are final. */
export declare const TERMINAL_STATES: readonly ProcessState[];

/** Whether a process state is final. */
export declare function isTerminal(state: string): boolean;

export interface Health {
  periodSeconds?: number;
  failureThreshold?: number;
  startTimeoutSeconds?: number;
}

export interface Exit {
  code: number | null;
  signal?: string;
  reason: 'exited' | 'crashed' | 'unhealthy' | 'killed' | 'memory_limit' | 'lost' | (string & {});
  detail?: string;
  logTail: string[];
}

/** The process object of API.md, as the LSPM answers it. */
export interface Process {
  id: string;
  fleet?: string;
  machineId: string;
  state: ProcessState | (string & {});
  pid: number;
  command: string[];
  params: Record<string, unknown>;
  labels: Record<string, string>;
  address: string;
  ports: Record<string, number>;
  players: number;
  instances?: number;
  sdk?: string;
  health?: Health;
  /** RFC 3339 UTC times. */
  createdAt: string;
  readyAt: string | null;
  lastHeartbeatAt: string | null;
  endedAt: string | null;
  exit: Exit | null;
}

/** Where the client reports its heartbeat loop's failures and recoveries; `console` fits. */
export interface Logger {
  info?(message: string, fields?: Record<string, unknown>): void;
  warn?(message: string, fields?: Record<string, unknown>): void;
}

/** The configuration of a Client. */
export interface Config {
  /** The process's id (required). */
  processId: string;
  /** Its process token (required). */
  token: string;
  /** The LSPM's base URL, e.g. http://127.0.0.1:7701 (required). */
  url: string;
  /** The spawn's params. */
  params?: Record<string, unknown>;
  machineId?: string;
  fleet?: string;
  /** Allocated ports by lower-case name ("game"). */
  ports?: Record<string, number>;
  /** Period of the heartbeat loop; default 2000. */
  heartbeatMs?: number;
  /** Bound of one HTTP request; default 5000. */
  requestTimeoutMs?: number;
  /** Receives the heartbeat loop's failures and recoveries; default none. */
  logger?: Logger;
  /**
   * Called with the process each time an answer carries a state different
   * from the last known one.
   */
  onState?: (process: Process) => void;
}

/** Options of the calls that talk to the LSPM. */
export interface CallOptions {
  /** Ends the call (and its retries) early. */
  signal?: AbortSignal;
}

/** The base class of every error the SDK raises. */
export declare class DediError extends Error {
  constructor(message: string, options?: { cause?: unknown; operation?: string });
  /** The SDK call that failed: "ready", "heartbeat", "shutdown", "process", or "config". */
  readonly operation: string;
  /** Whether repeating the call may succeed (the LSPM was unreachable or answered 5xx). */
  readonly retryable: boolean;
}

/** An error answer of the LSPM: an RFC 9457 problem document. */
export declare class ProblemError extends DediError {
  constructor(
    operation: string,
    problem: { type?: string; title?: string; status: number; detail?: string; code: string },
  );
  /** The HTTP status. */
  readonly status: number;
  /** The problem's stable code: "unauthorized", "forbidden", "invalid", "not_found", ... */
  readonly code: string;
  readonly title: string;
  readonly detail: string;
  readonly type: string;
}

/** The LSPM could not be reached or did not answer in time. */
export declare class ConnectionError extends DediError {
  constructor(operation: string, reason: string, cause?: unknown);
}

/** The caller's AbortSignal ended a call; `cause` is the signal's reason. */
export declare class AbortError extends DediError {
  constructor(operation: string, signal: AbortSignal, lastError?: DediError);
  readonly code: 'ABORT_ERR';
  /** The failure that was being retried, if any. */
  readonly lastError: DediError | undefined;
}

/** A call on, or interrupted by, a closed Client. */
export declare class ClosedError extends DediError {
  constructor(operation: string);
}

/** The configuration or the environment is unusable. */
export declare class ConfigError extends DediError {
  constructor(message: string);
}

/** Throws a ConfigError for a missing or malformed field. */
export declare function validateConfig(cfg: Config): void;

/**
 * Reads the environment an LSPM gives a game server process (default
 * process.env); throws a ConfigError when it is unusable.
 */
export declare function configFromEnv(env?: Record<string, string | undefined>): Config;

/**
 * A Client configured from the environment; options add to or replace what
 * it says. `options.env` replaces process.env.
 */
export declare function fromEnv(
  options?: Partial<Config> & { env?: Record<string, string | undefined> },
): Client;

/** Talks to the process's LSPM. */
export declare class Client {
  /** Does no I/O; throws a ConfigError for a bad cfg. */
  constructor(cfg: Config);
  /** The process's id. */
  readonly id: string;
  /** The id of the machine the process runs on ("" if unknown). */
  readonly machineId: string;
  /** The process's fleet ("" if none). */
  readonly fleet: string;
  /** A copy of the spawn's params. */
  readonly params: Record<string, unknown>;
  /** A copy of the allocated ports by lower-case name. */
  readonly ports: Record<string, number>;
  /** The period of the heartbeat loop in milliseconds. */
  readonly heartbeatMs: number;
  /** The last process state an answer carried, "" before the first one. */
  readonly state: ProcessState | '' | (string & {});
  /** Whether close was called. */
  readonly closed: boolean;
  /** The allocated port of that name ("game"), case-insensitively. */
  port(name: string): number | undefined;
  /** Sets the player count the next heartbeats carry; throws a RangeError unless a non-negative integer. */
  setPlayers(n: number): void;
  /** Sets the game instance count the next heartbeats carry. */
  setInstances(n: number): void;
  /** starting -> ready; retries on connection errors and 5xx until the signal aborts or close. */
  ready(options?: CallOptions): Promise<Process>;
  /** Announces the end; retries like ready. Null when the LSPM answers without a body. */
  shutdown(options?: CallOptions): Promise<Process | null>;
  /** One heartbeat with the counts last set; no retry. */
  heartbeat(options?: CallOptions): Promise<Process>;
  /** GET /v1/processes/{id}; no retry. */
  process(options?: CallOptions): Promise<Process>;
  /** Runs the heartbeat loop in the background until close or the signal aborts. */
  start(options?: CallOptions): void;
  /** The heartbeat loop: resolves on close, rejects with an AbortError when the signal aborts. */
  run(options?: CallOptions): Promise<void>;
  /** Stops the heartbeat loop and waits for it; calls in progress reject with a ClosedError. */
  close(): Promise<void>;
}
