/**
 * The native addon's generic helpers that the transfer layer uses
 * (native/src/sender.cc, native/src/crc32c.cc). Loading never throws: every
 * user has a JavaScript path for when the addon is missing, so the transfer
 * layer also works in a process that cannot load it.
 */
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

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

export interface DtlAddon {
  FileSender?: FileSenderConstructor;
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
