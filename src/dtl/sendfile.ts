/**
 * sendfile(2) from a file straight into a net.Socket, through the native
 * addon's FileSender (native/src/sender.cc), for owners serving large files.
 *
 * Reading a chunk into a JavaScript buffer and writing it to the socket
 * copies every byte twice on the owner; sendfile hands page-cache pages to
 * TCP and, on the project VM, cuts the owner's CPU per GiB served by more
 * than half (bench/transfer-raw.ts measures it). While a range is being
 * sent, the socket must carry nothing else: the caller waits for its own
 * writes to be flushed before starting and writes nothing until the range
 * is done.
 *
 * Where sendfile cannot be used (no addon, a socket without a descriptor,
 * a file system without splice support), `sendRange` says so before any
 * byte has gone and the caller streams the file itself.
 */
import type net from 'node:net';
import { addon, socketFd, type FileSenderHandle } from './addon.js';

const FileSender = addon.FileSender ?? null;
let enabled = FileSender !== null;

/** Turns sendfile off (or back on) for this process, so tests and benches can compare both paths. */
export function setSendfileEnabled(on: boolean): void {
  enabled = on && FileSender !== null;
}

export function sendfileAvailable(): boolean {
  return enabled;
}

const ECANCELED = 125;

/** How a range ended: `errno` 0 and `sent` equal to the length is success. */
export interface SendOutcome {
  errno: number;
  sent: number;
}

export interface RangeSend {
  done: Promise<SendOutcome>;
  /** Stops sending and shuts the connection down; `done` then resolves with ECANCELED. */
  cancel(): void;
}

/**
 * Starts sending file[offset, offset+length) on `sock`, or returns null when
 * sendfile is not available here (nothing has been sent then).
 * `stallMs`: a socket that accepts nothing for this long ends the send
 * with ETIMEDOUT.
 */
export function sendRange(sock: net.Socket, fileFd: number, offset: number, length: number, stallMs: number): RangeSend | null {
  if (!enabled || FileSender === null) return null;
  const fd = socketFd(sock);
  if (fd < 0) return null;
  let resolve!: (o: SendOutcome) => void;
  const done = new Promise<SendOutcome>((r) => (resolve = r));
  let sender: FileSenderHandle;
  try {
    sender = new FileSender(fd, fileFd, offset, length, stallMs, (errno, sent) => resolve({ errno, sent }));
  } catch {
    return null;
  }
  if (sender.start() !== 0) return null;
  return {
    done,
    cancel: () => {
      sender.cancel();
      resolve({ errno: ECANCELED, sent: sender.sent() });
    },
  };
}
