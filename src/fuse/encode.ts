/**
 * Reply payload encoders: the kernel's little-endian structs written into
 * Buffers. Layouts follow include/uapi/linux/fuse.h; sizes live in abi.ts.
 */
import {
  ATTR_OUT_SIZE,
  ATTR_SIZE,
  DIRENT_BASE,
  ENTRY_OUT_SIZE,
  FOPEN_CACHE_DIR,
  FOPEN_DIRECT_IO,
  FOPEN_KEEP_CACHE,
  FOPEN_NOFLUSH,
  FOPEN_NONSEEKABLE,
  FOPEN_PARALLEL_DIRECT_WRITES,
  FOPEN_PASSTHROUGH,
  OPEN_OUT_SIZE,
  STATFS_OUT_SIZE,
  direntType,
} from './abi.js';
import type { Attr, Entry, OpenReply, StatFs } from './types.js';

const NS = 1_000_000_000n;

function writeU64(buf: Buffer, value: number, off: number): void {
  buf.writeUInt32LE(value % 0x1_0000_0000 >>> 0, off);
  buf.writeUInt32LE(Math.floor(value / 0x1_0000_0000) >>> 0, off + 4);
}

function writeTime(buf: Buffer, ns: bigint, secOff: number, nsecOff: number): void {
  let sec = ns / NS;
  let nsec = ns % NS;
  if (nsec < 0n) {
    nsec += NS;
    sec -= 1n;
  }
  buf.writeBigInt64LE(sec, secOff);
  buf.writeUInt32LE(Number(nsec), nsecOff);
}

/** Splits a TTL in milliseconds into the (seconds, nanoseconds) pair FUSE wants. */
function writeTtl(buf: Buffer, ms: number, secOff: number, nsecOff: number): void {
  const sec = Math.floor(ms / 1000);
  writeU64(buf, sec, secOff);
  buf.writeUInt32LE(Math.round((ms - sec * 1000) * 1e6), nsecOff);
}

export function writeAttr(buf: Buffer, off: number, a: Attr): void {
  writeU64(buf, a.ino, off);
  writeU64(buf, a.size, off + 8);
  writeU64(buf, a.blocks, off + 16);
  writeTime(buf, a.atimeNs, off + 24, off + 48);
  writeTime(buf, a.mtimeNs, off + 32, off + 52);
  writeTime(buf, a.ctimeNs, off + 40, off + 56);
  buf.writeUInt32LE(a.mode >>> 0, off + 60);
  buf.writeUInt32LE(a.nlink >>> 0, off + 64);
  buf.writeUInt32LE(a.uid >>> 0, off + 68);
  buf.writeUInt32LE(a.gid >>> 0, off + 72);
  buf.writeUInt32LE(a.rdev >>> 0, off + 76);
  buf.writeUInt32LE(a.blksize >>> 0, off + 80);
  buf.writeUInt32LE(0, off + 84); // flags
}

export function writeEntry(buf: Buffer, off: number, e: Entry): void {
  writeU64(buf, e.nodeid, off);
  writeU64(buf, e.generation, off + 8);
  writeTtl(buf, e.entryTtlMs, off + 16, off + 32);
  writeTtl(buf, e.attrTtlMs, off + 24, off + 36);
  writeAttr(buf, off + 40, e.attr);
}

export function entryOut(e: Entry): Buffer {
  const buf = Buffer.alloc(ENTRY_OUT_SIZE);
  writeEntry(buf, 0, e);
  return buf;
}

export function attrOut(attr: Attr, ttlMs: number): Buffer {
  const buf = Buffer.alloc(ATTR_OUT_SIZE);
  writeTtl(buf, ttlMs, 0, 8);
  writeAttr(buf, 16, attr);
  return buf;
}

export function openFlags(o: OpenReply): number {
  let f = 0;
  if (o.directIo) f |= FOPEN_DIRECT_IO;
  if (o.keepCache) f |= FOPEN_KEEP_CACHE;
  if (o.nonSeekable) f |= FOPEN_NONSEEKABLE;
  if (o.cacheDir) f |= FOPEN_CACHE_DIR;
  if (o.noFlush) f |= FOPEN_NOFLUSH;
  if (o.parallelDirectWrites) f |= FOPEN_PARALLEL_DIRECT_WRITES;
  if (o.backingId !== undefined) f |= FOPEN_PASSTHROUGH;
  return f;
}

export function writeOpen(buf: Buffer, off: number, o: OpenReply): void {
  writeU64(buf, o.fh, off);
  buf.writeUInt32LE(openFlags(o), off + 8);
  buf.writeInt32LE(o.backingId ?? 0, off + 12);
}

export function openOut(o: OpenReply): Buffer {
  const buf = Buffer.alloc(OPEN_OUT_SIZE);
  writeOpen(buf, 0, o);
  return buf;
}

export function createOut(e: Entry, o: OpenReply): Buffer {
  const buf = Buffer.alloc(ENTRY_OUT_SIZE + OPEN_OUT_SIZE);
  writeEntry(buf, 0, e);
  writeOpen(buf, ENTRY_OUT_SIZE, o);
  return buf;
}

export function statfsOut(s: StatFs): Buffer {
  const buf = Buffer.alloc(STATFS_OUT_SIZE);
  writeU64(buf, s.blocks, 0);
  writeU64(buf, s.bfree, 8);
  writeU64(buf, s.bavail, 16);
  writeU64(buf, s.files, 24);
  writeU64(buf, s.ffree, 32);
  buf.writeUInt32LE(s.bsize, 40);
  buf.writeUInt32LE(s.namelen, 44);
  buf.writeUInt32LE(s.frsize, 48);
  return buf;
}

export function u64Out(value: number): Buffer {
  const buf = Buffer.alloc(8);
  writeU64(buf, value, 0);
  return buf;
}

export function writeOut(size: number): Buffer {
  const buf = Buffer.alloc(8);
  buf.writeUInt32LE(size, 0);
  return buf;
}

/**
 * Packs directory entries into at most `size` bytes, as READDIR (plus=false)
 * or READDIRPLUS wants them. Stops at the first entry that does not fit, so
 * the kernel asks again from that entry's offset.
 */
export class DirentPacker {
  private readonly buf: Buffer;
  private used = 0;
  constructor(private readonly size: number, private readonly plus: boolean) {
    this.buf = Buffer.alloc(size);
  }

  /** Returns false when the entry does not fit. */
  add(name: string, mode: number, ino: number, nextOffset: number, entry?: () => Entry): boolean {
    const nameLen = Buffer.byteLength(name);
    const head = this.plus ? ENTRY_OUT_SIZE : 0;
    const recLen = head + ((DIRENT_BASE + nameLen + 7) & ~7);
    if (this.used + recLen > this.size) return false;
    const off = this.used;
    if (this.plus) {
      const dot = name === '.' || name === '..';
      const e = !dot && entry ? entry() : undefined;
      if (e) {
        writeEntry(this.buf, off, e);
        if (e.nodeid) ino = e.attr.ino;
      } else {
        // A zero entry tells the kernel not to instantiate (or count) it.
        this.buf.fill(0, off, off + ENTRY_OUT_SIZE);
        writeAttrStub(this.buf, off + 40, mode, ino);
      }
    }
    const d = off + head;
    writeU64(this.buf, ino, d);
    writeU64(this.buf, nextOffset, d + 8);
    this.buf.writeUInt32LE(nameLen, d + 16);
    this.buf.writeUInt32LE(direntType(mode), d + 20);
    this.buf.write(name, d + DIRENT_BASE);
    this.buf.fill(0, d + DIRENT_BASE + nameLen, off + recLen);
    this.used += recLen;
    return true;
  }

  result(): Buffer {
    return this.buf.subarray(0, this.used);
  }
}

function writeAttrStub(buf: Buffer, off: number, mode: number, ino: number): void {
  buf.fill(0, off, off + ATTR_SIZE);
  writeU64(buf, ino, off);
  buf.writeUInt32LE(mode >>> 0, off + 60);
}
