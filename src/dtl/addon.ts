/**
 * The native addon's generic helpers that the transfer layer uses
 * (native/src/sender.cc, native/src/receiver.cc, native/src/crc32c.cc). Loading never throws: every
 * user has a JavaScript path for when the addon is missing, so the transfer
 * layer also works in a process that cannot load it.
 */
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import type net from 'node:net';

export interface FileSenderHandle {
  /** 0, or a negative errno (then onDone is never called). */
  start(): number;
  /** Stops and shuts the socket down; onDone is not called. */
  cancel(): void;
  /** Bytes handed to the socket so far. */
  sent(): number;
}

export interface FileSenderConstructor {
  new (socketFd: number, fileFd: number, offset: number, length: number, stallMs: number, onDone: (errno: number, sent: number) => void): FileSenderHandle;
}

export interface FileReceiverHandle {
  /** 0, or a negative errno (then onDone is never called). */
  start(): number;
  /** Stops and shuts the socket down; onDone is not called. */
  cancel(): void;
  /** Bytes written to the file so far. */
  received(): number;
}

export interface FileReceiverConstructor {
  new (
    socketFd: number,
    fileFd: number,
    offset: number,
    length: number,
    stallMs: number,
    crc: number,
    onDone: (errno: number, received: number, crc: number, fileError: boolean) => void,
  ): FileReceiverHandle;
}

export interface DtlAddon {
  FileSender?: FileSenderConstructor;
  FileReceiver?: FileReceiverConstructor;
  /** Keeps up to `n` touched receive buffers for the pulls to come; returns how many are kept. */
  reserveReceiveBuffers?: (n: number) => number;
  /** CRC-32C of `data` chained from `crc`; `portable` skips the CPU instruction. */
  crc32c?: (data: Uint8Array, crc?: number, portable?: boolean) => number;
}

function load(): DtlAddon {
  try {
    // dist/src/dtl -> repository root
    const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
    return createRequire(import.meta.url)(path.join(root, 'native', 'build', 'Release', 'dyadfuse.node')) as DtlAddon;
  } catch {
    return {};
  }
}

export const addon: DtlAddon = load();

/** The descriptor under a connected net.Socket, or -1 (Node keeps it in an internal handle). */
export function socketFd(sock: net.Socket): number {
  const fd = (sock as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : -1;
}
