// Helpers shared by the drivers: the control file and a fresh official SDK.

import { readFile } from 'node:fs/promises';
import AgonesSDK from '@google-cloud/agones-sdk';

/**
 * Reads the control file ({"players": N, "shutdown": bool}); a missing or
 * unparsable file keeps the previous values.
 * @param {string} path
 * @param {{players: number, shutdown: boolean}} prev
 */
export async function readControl(path, prev) {
  try {
    const c = JSON.parse(await readFile(path, 'utf8'));
    const players = c.players ?? 0;
    if (Number.isInteger(players) && players >= 0) {
      return { players, shutdown: c.shutdown === true };
    }
  } catch {
    // keep the previous values
  }
  return prev;
}

/**
 * Opens the official SDK (it dials localhost:$AGONES_SDK_GRPC_PORT). The
 * SDK's health() keeps one client stream open and never replaces it when it
 * breaks (under Agones the sidecar lives as long as the game), so this
 * forgets the stream once it ended: the next health() opens a new one.
 */
export async function openSDK() {
  const sdk = new AgonesSDK();
  await sdk.connect();
  const health = sdk.health.bind(sdk);
  sdk.health = (errorCallback) => {
    const before = sdk.healthStream;
    health((err) => {
      sdk.healthStream = undefined;
      if (errorCallback) errorCallback(err);
    });
    const stream = sdk.healthStream;
    if (stream !== before && stream !== undefined) {
      stream.on('status', () => {
        if (sdk.healthStream === stream) sdk.healthStream = undefined;
      });
    }
  };
  return sdk;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
