/**
 * Receiving the rest of a file body from a net.Socket on a native thread
 * (native/src/receiver.cc): socket -> buffer -> CRC-32C -> pwrite, off the
 * event loop. The counterpart of sendfile.ts on the consumer side.
 *
 * A pull of a large file used to move every byte through the daemon's one
 * JavaScript thread, which is also the thread serving FUSE: while a 64 MiB
 * file streamed in, every other open on the mount waited behind read
 * callbacks. The thread also lets a pull and the FUSE work (or two pulls)
 * use different cores.
 *
 * The caller pauses the socket before starting and resumes it after `done`:
 * the thread reads exactly `length` bytes, so the next reply on a reused
 * connection is left for the socket. Where the addon is missing, or the
 * digest is not CRC-32C, `receiveRange` returns null and the caller reads
 * the body itself.
 */
import diagnostics from 'node:diagnostics_channel';
import type net from 'node:net';
import { addon, socketFd, type FileReceiverHandle } from './addon.js';

/** Published when the thread takes over a body: `{ peer, upath, offset, length }`. */
export const receiveChannel = diagnostics.channel('dyad-fs:dtl:receive-thread');

const FileReceiver = addon.FileReceiver ?? null;
let enabled = FileReceiver !== null;

/** Turns the receive thread off (or back on) for this process, so tests and benches can compare both paths. */
export function setReceiveThreadEnabled(on: boolean): void {
  enabled = on && FileReceiver !== null;
}

export function receiveThreadAvailable(): boolean {
  return enabled;
}

/**
 * Has `n` receive buffers ready before the first pull (a fresh one is
 * faulted in page by page on its first fill); returns how many are kept,
 * 0 without the thread.
 */
export function prepareReceiveBuffers(n = 1): number {
  return enabled ? (addon.reserveReceiveBuffers?.(n) ?? 0) : 0;
}

/** How a range ended: `errno` 0 means every byte was written and `crc` covers them. */
export interface ReceiveOutcome {
  errno: number;
  received: number;
  crc: number;
  /** The errno came from writing the file (ENOSPC, EIO), not from the socket. */
  fileError: boolean;
}

export interface RangeReceive {
  done: Promise<ReceiveOutcome>;
  /** Stops and shuts the connection down; `done` then resolves with ECANCELED. */
  cancel(): void;
}

const ECANCELED = 125;

/**
 * Starts receiving `length` bytes from `sock` into file[offset...], the
 * CRC-32C chained from `crc`; or returns null when the thread cannot be used
 * (nothing has been read then). `stallMs`: a socket silent this long ends
 * the range with ETIMEDOUT; time spent writing a slow disk does not count.
 */
export function receiveRange(sock: net.Socket, fileFd: number, offset: number, length: number, stallMs: number, crc: number): RangeReceive | null {
  if (!enabled || FileReceiver === null) return null;
  const fd = socketFd(sock);
  if (fd < 0) return null;
  let resolve!: (o: ReceiveOutcome) => void;
  const done = new Promise<ReceiveOutcome>((r) => (resolve = r));
  let receiver: FileReceiverHandle;
  try {
    receiver = new FileReceiver(fd, fileFd, offset, length, stallMs, crc >>> 0, (errno, received, c, fileError) => resolve({ errno, received, crc: c >>> 0, fileError }));
  } catch {
    return null;
  }
  if (receiver.start() !== 0) return null;
  return {
    done,
    cancel: () => {
      receiver.cancel();
      resolve({ errno: ECANCELED, received: receiver.received(), crc: 0, fileError: false });
    },
  };
}
