/**
 * The temporary file every transfer lands in: ".dyad-part-*" beside the
 * destination, created with the producer's mode exactly, and at the end
 * either renamed over the destination (after an optional fsync) or removed.
 * A reader therefore sees the old file or the whole new one, never a torn
 * copy; DYAD writes the destination in place and leaves a partial file
 * that the next open trusts.
 *
 * The sinks (sink.ts for streams, ucx/sink.ts for chunks in any order, and
 * landWhole for bytes already in memory) decide what goes in; this file
 * decides how it lands.
 */
import { closeSync, constants, fchmodSync, fsync as fsFsync, openSync, renameSync, unlinkSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { localError } from './errors.js';

export const PART_PREFIX = '.dyad-part-';

let seq = 0;
const instance = randomBytes(4).toString('hex');

/** A temp name beside the destination, unique across daemons sharing the directory. */
export function partPathFor(destPath: string): string {
  return join(dirname(destPath), `${PART_PREFIX}${process.pid}-${instance}-${++seq}`);
}

const PART_NAME = /^\.dyad-part-(\d+)-([0-9a-f]+)-\d+$/;

/**
 * Was this ".dyad-part-*" name left by a pull that can no longer finish?
 * Several daemons may share one storage (DYAD_SERVICE_MUX), so only a name
 * whose daemon (the pid in it) is gone is stale; a name of this very daemon
 * is a pull under way. A dead daemon's pid taken by another live process
 * keeps the file, hidden, until that process ends: the safe mistake.
 */
export function isStalePart(name: string): boolean {
  const m = PART_NAME.exec(name);
  if (!m) return true;
  if (m[2] === instance) return false;
  const pid = Number(m[1]);
  // Our pid with another instance: an earlier daemon whose pid we were given.
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return false;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ESRCH';
  }
}

function fsyncAsync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fsFsync(fd, (err) => (err ? reject(err) : resolve())));
}

export class PartFile {
  readonly path: string;
  /** Open for writing between create() and land() or discard(); -1 otherwise. */
  fd = -1;
  private created = false;
  private done = false;

  /** `peer` and `upath` name the transfer in errors. */
  constructor(
    readonly destPath: string,
    private readonly mode: number | undefined,
    private readonly peer: string,
    private readonly upath: string,
  ) {
    this.path = partPathFor(destPath);
  }

  /** Creates the file; throws DYAD_ENOSPC / DYAD_ELOCAL (nothing is left behind). */
  create(): void {
    try {
      this.fd = openSync(this.path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, this.mode ?? 0o644);
      this.created = true;
      // open(2) applies the umask; the producer's mode must survive exactly.
      if (this.mode !== undefined) fchmodSync(this.fd, this.mode);
    } catch (err) {
      this.discard();
      throw localError(this.peer, this.upath, this.destPath, err);
    }
  }

  /**
   * Renames the complete file over the destination, with fsync of the file
   * first and of the directory after when asked. Throws DYAD_ELOCAL /
   * DYAD_ENOSPC; the caller then discards.
   */
  async land(fsync: boolean): Promise<void> {
    if (fsync) {
      try {
        await fsyncAsync(this.fd);
      } catch (err) {
        throw localError(this.peer, this.upath, this.destPath, err);
      }
    }
    this.landSync();
    if (fsync) await syncDir(dirname(this.destPath));
  }

  /** land(false), for callers that cannot wait. */
  landSync(): void {
    try {
      closeSync(this.fd);
      this.fd = -1;
      renameSync(this.path, this.destPath);
      this.done = true;
    } catch (err) {
      throw localError(this.peer, this.upath, this.destPath, err);
    }
  }

  /** Closes and removes the file unless it landed; safe to call more than once. */
  discard(): void {
    if (this.done) return;
    this.done = true;
    if (this.fd >= 0) {
      try {
        closeSync(this.fd);
      } catch {
        /* already reported or irrelevant */
      }
      this.fd = -1;
    }
    if (!this.created) return;
    try {
      unlinkSync(this.path);
    } catch {
      /* already gone */
    }
  }
}

// The rename is durable only once the directory is. Failing a transfer that
// has already landed over it would be worse than DYAD_FSYNC_WRITE's best effort.
async function syncDir(dir: string): Promise<void> {
  let dfd = -1;
  try {
    dfd = openSync(dir, constants.O_RDONLY | constants.O_DIRECTORY);
    await fsyncAsync(dfd);
  } catch {
    /* best effort */
  } finally {
    if (dfd >= 0) closeSync(dfd);
  }
}
