/**
 * Lands a pulled file atomically: bytes go into a temp file beside the
 * destination (part.ts), are digested as they arrive, and only a complete
 * file whose size and digest match what the producer published is renamed
 * into place. Anything else removes the temp file, so a reader never sees a
 * torn or stale copy (DYAD leaves the partial file where the next open
 * trusts it).
 *
 * Backend-neutral: a transport hands the sink either a region to receive
 * into (zero-copy: the socket reads straight into a write buffer) or bytes
 * it already holds, or takes over the writing itself (handOff/absorb: the
 * TCP client's receive thread). Full buffers are written with large positional writes,
 * inline or on the thread pool (inline.ts decides); a sink holding its limit
 * of buffers (pool writes behind) returns no region, which is the
 * transport's signal to stop reading until onResume fires (backpressure
 * from the disk to the peer).
 */
import { write as fsWrite } from 'node:fs';
import { writeAllSync } from './io.js';
import { DyadError } from '../errors.js';
import { algoOf, crcUpdate, formatDigest, sameDigest, type DigestAlgo } from './digest.js';
import { digestError, localError } from './errors.js';
import type { BufferPool } from './buffers.js';
import { inlineWrites, type IoMode } from './inline.js';
import { PartFile } from './part.js';

/** Where full buffers are written: see inline.ts. */
export type WriteMode = IoMode;

export interface SinkOptions {
  pool: BufferPool;
  /** Buffers one sink may hold, the one filling plus those being written. */
  buffersPerSink: number;
  writeMode: WriteMode;
  mode?: number;
  fsync?: boolean;
}

/** Throws DYAD_EDIGEST unless what was received is what the producer published. */
export function checkReceived(peer: string, upath: string, expect: { size: number; digest: string }, received: number, crc: number): void {
  if (received !== expect.size) throw digestError(peer, upath, `size mismatch: expected ${expect.size} bytes, received ${received}`);
  const got = formatDigest(crc, algoOf(expect.digest));
  if (!sameDigest(got, expect.digest)) throw digestError(peer, upath, `digest mismatch: expected ${expect.digest}, received ${got}`);
}

export class FileSink {
  private readonly part: PartFile;
  private readonly algo: DigestAlgo;
  private crc = 0;
  private received = 0;
  private cur: Buffer | null = null;
  private curFill = 0;
  private held = 0;
  private writing = 0;
  private readonly queue: { buf: Buffer; len: number; pos: number }[] = [];
  private writePos = 0;
  private failure: DyadError | null = null;
  private drained: (() => void) | null = null;
  /** Called when a region is available again after region() returned null. */
  onResume: (() => void) | null = null;
  /** Called once if a background write fails, so the transport can stop early. */
  onError: ((err: DyadError) => void) | null = null;

  constructor(
    readonly destPath: string,
    private readonly expect: { size: number; digest: string },
    private readonly o: SinkOptions,
    private readonly peer: string,
    private readonly upath: string,
  ) {
    this.part = new PartFile(destPath, o.mode, peer, upath);
    this.algo = algoOf(expect.digest);
  }

  get bytes(): number {
    return this.received;
  }

  /** Creates the temp file; throws DYAD_ENOSPC/DYAD_ELOCAL. */
  open(): void {
    this.part.create();
  }

  /** Where the transport should receive next (at most `max` bytes), or null to pause. */
  region(max: number): Buffer | null {
    if (this.failure) return null;
    if (!this.cur) {
      if (this.held >= this.o.buffersPerSink) return null;
      this.cur = this.o.pool.take();
      this.held++;
      this.curFill = 0;
    }
    return this.cur.subarray(this.curFill, Math.min(this.cur.length, this.curFill + max));
  }

  /** `n` bytes arrived in the region last returned. */
  commit(n: number): void {
    const cur = this.cur!;
    this.crc = crcUpdate(this.algo, this.crc, cur.subarray(this.curFill, this.curFill + n));
    this.curFill += n;
    this.received += n;
    if (this.curFill === cur.length) this.flush();
  }

  /** Bytes the transport already holds (copied or written before returning). */
  write(data: Buffer): void {
    if (this.failure) return;
    this.crc = crcUpdate(this.algo, this.crc, data);
    if (this.received === 0 && this.cur === null && data.length === this.expect.size) {
      // The whole (small) file in hand: one write(2), no buffer copy.
      this.received = data.length;
      this.writePos = data.length;
      try {
        writeAllSync(this.part.fd, data, 0);
      } catch (err) {
        this.fail(err);
      }
      return;
    }
    let o = 0;
    while (o < data.length) {
      if (!this.cur) {
        // May exceed buffersPerSink by one: these bytes are already read.
        this.cur = this.o.pool.take();
        this.held++;
        this.curFill = 0;
      }
      const n = Math.min(this.cur.length - this.curFill, data.length - o);
      data.copy(this.cur, this.curFill, o, o + n);
      o += n;
      this.curFill += n;
      this.received += n;
      if (this.curFill === this.cur.length) this.flush();
    }
  }

  /**
   * Hands the rest of the body to a receiver that writes the file itself
   * (receive.ts): writes out what this sink holds and says where the rest
   * goes. Null when that receiver cannot continue the digest (it computes
   * only CRC-32C) or the sink has failed.
   */
  handOff(): { fd: number; offset: number; crc: number } | null {
    if (this.failure || this.algo !== 'crc32c') return null;
    this.flush();
    return { fd: this.part.fd, offset: this.writePos, crc: this.crc };
  }

  /** The receiver wrote `n` bytes after the hand-off; `crc` now covers the whole file so far. */
  absorb(n: number, crc: number): void {
    this.received += n;
    this.writePos += n;
    this.crc = crc;
  }

  /** A write by the receiver failed: the pull fails as if this sink's own write had. */
  failWrite(err: unknown): void {
    this.fail(err);
  }

  private fail(err: unknown): void {
    if (this.failure) return;
    this.failure = localError(this.peer, this.upath, this.destPath, err);
    this.onError?.(this.failure);
  }

  private flush(): void {
    const buf = this.cur;
    const len = this.curFill;
    this.cur = null;
    this.curFill = 0;
    if (!buf) return;
    if (len === 0 || this.failure) {
      this.release(buf);
      return;
    }
    const pos = this.writePos;
    this.writePos += len;
    const t0 = inlineWrites.begin(this.o.writeMode);
    if (t0 >= 0) {
      try {
        writeAllSync(this.part.fd, buf.subarray(0, len), pos);
      } catch (err) {
        this.fail(err);
      }
      inlineWrites.done(t0, len);
      this.release(buf);
      return;
    }
    this.queue.push({ buf, len, pos });
    if (this.writing === 0) this.writeNext();
  }

  // One write(2) in flight per file: writes to one inode serialise on its
  // lock in the kernel anyway, so more would only park thread-pool threads
  // that other files' writes could use. Parallelism comes from several pulls.
  private writeNext(): void {
    const w = this.queue.shift();
    if (!w) {
      this.drained?.();
      return;
    }
    this.writing = 1;
    const step = (off: number): void => {
      fsWrite(this.part.fd, w.buf, off, w.len - off, w.pos + off, (err, n) => {
        if (!err && !this.failure && off + n < w.len) return step(off + n);
        this.writing = 0;
        if (err) this.fail(err);
        this.release(w.buf);
        if (this.failure) this.dropQueue();
        this.writeNext();
      });
    };
    step(0);
  }

  private dropQueue(): void {
    for (const w of this.queue.splice(0)) this.release(w.buf);
  }

  private release(buf: Buffer): void {
    this.held--;
    this.o.pool.give(buf);
    if (this.onResume && this.held < this.o.buffersPerSink && !this.failure) {
      const r = this.onResume;
      this.onResume = null;
      r();
    }
  }

  private allWritten(): Promise<void> {
    if (this.writing === 0 && this.queue.length === 0) return Promise.resolve();
    return new Promise((resolve) => {
      this.drained = () => {
        this.drained = null;
        resolve();
      };
    });
  }

  /**
   * Every byte has been supplied: waits for the writes, verifies size and
   * digest, optionally fsyncs, renames into place. Rejects (temp file
   * removed) on any failure.
   */
  async finish(): Promise<{ bytes: number }> {
    try {
      this.flush();
      await this.allWritten();
      if (this.failure) throw this.failure;
      checkReceived(this.peer, this.upath, this.expect, this.received, this.crc);
      await this.part.land(this.o.fsync === true);
      return { bytes: this.received };
    } catch (err) {
      await this.abort();
      throw err;
    }
  }

  /** Stops: waits for writes in flight (the fd must outlive them), then removes the temp file. */
  async abort(): Promise<void> {
    this.failure ??= new DyadError('DYAD_EINTR', 0, 'sink aborted');
    this.onResume = null;
    if (this.cur) {
      const b = this.cur;
      this.cur = null;
      this.release(b);
    }
    this.dropQueue();
    await this.allWritten();
    this.part.discard();
  }
}

/**
 * Lands bytes already in memory (content pushed with a publication) with
 * the same guarantees as a pull: checked against the published size and
 * digest first, then written to a temp file and renamed into place.
 */
export function landWhole(destPath: string, data: Uint8Array, expect: { size: number; digest: string }, mode: number | undefined, from: string, upath: string): void {
  checkReceived(from, upath, expect, data.byteLength, crcUpdate(algoOf(expect.digest), 0, data));
  const part = new PartFile(destPath, mode, from, upath);
  part.create();
  try {
    writeAllSync(part.fd, data, 0);
    part.landSync();
  } catch (err) {
    part.discard();
    throw err instanceof DyadError ? err : localError(from, upath, destPath, err);
  }
}
