/**
 * The storage directory behind a mount, reached by path even when the
 * mount sits on top of it.
 *
 * `dyad-mount DIR` serves DIR's own contents: the daemon opens DIR before
 * mounting and reaches it afterwards through /proc/self/fd/N, which resolves
 * to the directory underneath the mount rather than to the mount itself.
 */
import fs from 'node:fs';
import type { Attr, StatFs } from '../fuse/types.js';

export class Storage {
  /** Path prefix that reaches the storage, e.g. /proc/self/fd/17. */
  readonly root: string;
  private readonly rootFd: number;

  private constructor(readonly dir: string, rootFd: number) {
    this.rootFd = rootFd;
    this.root = `/proc/self/fd/${rootFd}`;
  }

  /** Opens dir now, so it stays reachable after a mount covers it. */
  static open(dir: string): Storage {
    const fd = fs.openSync(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
    return new Storage(dir, fd);
  }

  /** Absolute path (through the root fd) of a path relative to the storage. */
  abs(rel: string): string {
    return rel === '' ? `${this.root}/.` : `${this.root}/${rel}`;
  }

  statfs(): StatFs {
    const s = fs.statfsSync(this.root);
    return {
      blocks: s.blocks,
      bfree: s.bfree,
      bavail: s.bavail,
      files: s.files,
      ffree: s.ffree,
      bsize: s.bsize,
      namelen: 255,
      frsize: s.bsize,
    };
  }

  close(): void {
    fs.closeSync(this.rootFd);
  }
}

/** Attributes for the kernel from a stat of the backing file. */
export function toAttr(st: fs.BigIntStats): Attr {
  return {
    ino: Number(st.ino),
    size: Number(st.size),
    blocks: Number(st.blocks),
    atimeNs: st.atimeNs,
    mtimeNs: st.mtimeNs,
    ctimeNs: st.ctimeNs,
    mode: Number(st.mode),
    nlink: Number(st.nlink),
    uid: Number(st.uid),
    gid: Number(st.gid),
    rdev: Number(st.rdev),
    blksize: Number(st.blksize),
  };
}

export function lstat(path: string): fs.BigIntStats {
  return fs.lstatSync(path, { bigint: true });
}

/** lstat, or undefined when the name does not exist (other errors still throw). */
export function lstatIfExists(path: string): fs.BigIntStats | undefined {
  return fs.lstatSync(path, { bigint: true, throwIfNoEntry: false });
}

export function fstat(fd: number): fs.BigIntStats {
  return fs.fstatSync(fd, { bigint: true });
}
