/**
 * The origin: a read-only directory, typically a dataset on the parallel
 * file system, behind the managed directory (--origin, DYAD_PATH_ORIGIN).
 *
 * Deep-learning training shards its samples over the nodes' local storage:
 * the first node to read a sample that no node has yet copies it from the
 * origin into its storage and publishes it, and every later reader pulls it
 * from that node instead of going back to the shared file system. Names in
 * the origin show in stat and readdir like published files, before any
 * byte moves.
 *
 * DYAD's DYAD_PATH_ORIGIN fills missing 64 KiB ranges of a local file
 * lazily, with a bitmap beside it. Here a file is copied whole, the way a
 * pull is: into a temp file, checksummed on the way, renamed into place,
 * so a reader sees all of it or none, and the digest other nodes check is
 * the one of the bytes actually copied.
 */
import fs from 'node:fs';
import path from 'node:path';
import { DyadError, errnoOf, errnos } from '../errors.js';
import { DIGEST_ALGO, crcUpdate, formatDigest } from '../dtl/digest.js';
import { readAt, writeAllSync, writeAt } from '../dtl/io.js';
import { PartFile } from '../dtl/part.js';

export interface OriginStat {
  kind: 'file' | 'dir';
  size: number;
  mode: number;
  mtimeMs: number;
}

/** What a copy produced: what to publish. */
export interface OriginCopy {
  size: number;
  mode: number;
  mtimeMs: number;
  digest: string;
}

const CHUNK = 1 << 20;
/** Files up to this size are copied with synchronous calls: one thread-pool round trip per read and write would cost more than the copy. */
const SMALL = 1 << 20;

export class Origin {
  /** `root`: an absolute directory outside the mount and its storage (the daemon checks). */
  constructor(readonly root: string) {}

  private abs(upath: string): string {
    // upaths come from the mount's own names: relative, normalised, no "..".
    return path.join(this.root, upath);
  }

  /** A regular file or directory under the origin (symlinks followed), else undefined. */
  stat(upath: string): OriginStat | undefined {
    let st: fs.Stats | undefined;
    try {
      st = fs.statSync(this.abs(upath), { throwIfNoEntry: false });
    } catch {
      return undefined; // unreadable (EACCES, ELOOP...): as if absent
    }
    if (!st || !(st.isFile() || st.isDirectory())) return undefined;
    return { kind: st.isDirectory() ? 'dir' : 'file', size: st.size, mode: st.mode, mtimeMs: Math.floor(st.mtimeMs) };
  }

  /** A directory's entries that are files or directories; [] when it cannot be read. */
  list(upath: string): Array<{ name: string; isDir: boolean }> {
    let dirents: fs.Dirent[];
    try {
      dirents = fs.readdirSync(this.abs(upath), { withFileTypes: true });
    } catch {
      return [];
    }
    const out: Array<{ name: string; isDir: boolean }> = [];
    for (const d of dirents) {
      if (d.isFile() || d.isDirectory()) out.push({ name: d.name, isDir: d.isDirectory() });
      else if (d.isSymbolicLink()) {
        const st = this.stat(path.posix.join(upath, d.name));
        if (st) out.push({ name: d.name, isDir: st.kind === 'dir' });
      }
    }
    return out;
  }

  /**
   * Copies origin/upath to `dest` (a temp file renamed into place, the
   * origin's mode and mtime kept). Resolves with what to publish, or
   * undefined when the origin has no such regular file. Throws DYAD_EORIGIN
   * (EIO), DYAD_ENOSPC or DYAD_EINTR; nothing is left behind then.
   */
  async copy(upath: string, dest: string, signal?: AbortSignal): Promise<OriginCopy | undefined> {
    const src = this.abs(upath);
    let fd: number;
    try {
      fd = fs.openSync(src, fs.constants.O_RDONLY);
    } catch (err) {
      if (errnoOf(err) === errnos.ENOENT) return undefined;
      throw this.failure(upath, err);
    }
    const from = `origin ${this.root}`;
    let part: PartFile | undefined;
    try {
      const st = fs.fstatSync(fd);
      if (!st.isFile()) return undefined;
      const mode = st.mode & 0o7777;
      part = new PartFile(dest, mode, from, upath);
      part.create();
      const buf = Buffer.allocUnsafe(Math.min(CHUNK, Math.max(st.size, 1)));
      let crc = 0;
      let pos = 0;
      const sync = st.size <= SMALL;
      for (;;) {
        if (signal?.aborted) throw new DyadError('DYAD_EINTR', errnos.EINTR, `${upath}: copy from the origin interrupted`);
        const n = sync ? fs.readSync(fd, buf, 0, buf.length, pos) : await readAt(fd, buf, buf.length, pos);
        if (n === 0) break;
        crc = crcUpdate(DIGEST_ALGO, crc, buf.subarray(0, n));
        if (sync) {
          writeAllSync(part.fd, buf.subarray(0, n), pos);
        } else {
          await writeAt(part.fd, buf, n, pos);
        }
        pos += n;
      }
      // The copy keeps the origin's mtime, so every node shows the same one.
      // In seconds with their fraction: a Date would cut it to the
      // millisecond, and the copy's mtime would then fall 1 ms after the
      // one published about half the time (a restart takes that for a
      // changed file, republishes it, and no longer sees an origin copy).
      fs.futimesSync(part.fd, st.atimeMs / 1000, st.mtimeMs / 1000);
      await part.land(false);
      return { size: pos, mode: st.mode, mtimeMs: Math.floor(st.mtimeMs), digest: formatDigest(crc, DIGEST_ALGO) };
    } catch (err) {
      part?.discard();
      throw err instanceof DyadError ? err : this.failure(upath, err);
    } finally {
      fs.closeSync(fd);
    }
  }

  private failure(upath: string, err: unknown): DyadError {
    const errno = errnoOf(err);
    if (errno === errnos.ENOSPC) return new DyadError('DYAD_ENOSPC', errnos.ENOSPC, `${upath}: copy from the origin: no space left in storage`, { cause: err });
    return new DyadError('DYAD_EORIGIN', errnos.EIO, `${upath}: copy from the origin ${this.root} failed: ${(err as Error).message}`, { cause: err });
  }
}
