/**
 * The UCX backend's temp-file sink. Same contract as src/dtl/sink.ts (bytes
 * land in ".dyad-part-*" beside the destination; only a complete file whose
 * size and digest match is renamed into place; anything else unlinks it),
 * but shaped for RDMA-style transfers: several chunks are in flight at
 * once, each received by UCX straight into its own registered buffer, and
 * they may complete in any order. FileSink hands out one region at a time
 * and digests in arrival order, so it cannot take that.
 *
 * Each completed chunk is written with a positional write from the very
 * buffer UCX filled (no copy) and digested once every earlier byte has
 * been; its buffer goes back to the transport only after both. Writes run
 * inline while the page cache keeps up and on the thread pool otherwise,
 * one at a time per file (inline.ts has the measurements behind that).
 *
 * Or the native chunk mover does all of that on its own thread
 * (handOff/absorb): the sink then only owns the temp file and the checks.
 */
import { write as fsWrite } from 'node:fs';
import { writeAllSync } from '../io.js';
import { DyadError } from '../../errors.js';
import { algoOf, crcUpdate, type DigestAlgo } from '../digest.js';
import { digestError, localError } from '../errors.js';
import { inlineWrites, type IoMode } from '../inline.js';
import { PartFile } from '../part.js';
import { checkReceived } from '../sink.js';

export interface ChunkSinkOptions {
  writeMode: IoMode;
  mode?: number;
  fsync?: boolean;
}

interface Chunk {
  offset: number;
  buf: Buffer;
  release: () => void;
  digested: boolean;
  written: boolean;
  released: boolean;
}

export class ChunkSink {
  private readonly part: PartFile;
  private readonly algo: DigestAlgo;
  private crc = 0;
  private digestedTo = 0;
  private received = 0;
  private readonly waitingDigest = new Map<number, Chunk>();
  private readonly writeQueue: Chunk[] = [];
  private writing = false;
  private holding = 0;
  private failure: DyadError | null = null;
  private idle: (() => void) | null = null;
  /** Called once if a write fails, so the transport can stop early. */
  onError: ((err: DyadError) => void) | null = null;

  constructor(
    readonly destPath: string,
    private readonly expect: { size: number; digest: string },
    private readonly o: ChunkSinkOptions,
    private readonly peer: string,
    private readonly upath: string,
  ) {
    this.part = new PartFile(destPath, o.mode, peer, upath);
    this.algo = algoOf(expect.digest);
  }

  get bytes(): number {
    return this.received;
  }

  /** Chunks handed in and not yet released (their buffers are still ours). */
  get held(): number {
    return this.holding;
  }

  get failed(): DyadError | null {
    return this.failure;
  }

  /**
   * Hands the writing over to the native chunk mover: the fd of the temp
   * file and the digest algorithm to compute, or null when the sink has
   * failed or already holds chunks.
   */
  handOff(): { fd: number; algo: DigestAlgo } | null {
    if (this.failure || this.received > 0) return null;
    return { fd: this.part.fd, algo: this.algo };
  }

  /** The mover wrote `n` bytes; `crc` is their digest in file order. */
  absorb(n: number, crc: number): void {
    this.received = n;
    this.digestedTo = n;
    this.crc = crc >>> 0;
  }

  /**
   * The whole (small) file, from a buffer the caller keeps only for this
   * call: written at once with one write(2). A 4 KiB file is not worth a
   * thread-pool round trip, which on the project VM costs more than the
   * rest of its pull, and the adaptive policy would send it there for two
   * seconds after any slow write.
   */
  whole(data: Buffer): void {
    if (this.failure) return;
    this.crc = crcUpdate(this.algo, this.crc, data);
    this.received = data.length;
    this.digestedTo = data.length;
    try {
      writeAllSync(this.part.fd, data, 0);
    } catch (err) {
      this.fail(err);
    }
  }

  /** A write by the mover failed: the pull fails as if this sink's own write had. */
  failWrite(err: unknown): void {
    this.fail(err);
  }

  /** Creates the temp file; throws DYAD_ENOSPC/DYAD_ELOCAL. */
  open(): void {
    this.part.create();
  }

  /**
   * `buf` holds the file's bytes at `offset`. `release` is called once the
   * sink no longer needs `buf` (written and digested, or dropped after a failure).
   */
  put(offset: number, buf: Buffer, release: () => void): void {
    if (this.failure) {
      release();
      return;
    }
    const c: Chunk = { offset, buf, release, digested: false, written: false, released: false };
    this.holding++;
    this.received += buf.length;
    this.waitingDigest.set(offset, c);
    this.advanceDigest();
    this.writeQueue.push(c);
    if (!this.writing) this.writeNext();
  }

  private advanceDigest(): void {
    for (;;) {
      const c = this.waitingDigest.get(this.digestedTo);
      if (!c) return;
      this.waitingDigest.delete(this.digestedTo);
      this.crc = crcUpdate(this.algo, this.crc, c.buf);
      this.digestedTo += c.buf.length;
      c.digested = true;
      this.settle(c);
    }
  }

  private settle(c: Chunk): void {
    if (!c.digested || !c.written || c.released) return;
    c.released = true;
    this.holding--;
    c.release();
    this.checkIdle();
  }

  private checkIdle(): void {
    if (this.idle && !this.writing && this.writeQueue.length === 0) {
      const f = this.idle;
      this.idle = null;
      f();
    }
  }

  private fail(err: unknown): void {
    if (this.failure) return;
    this.failure = localError(this.peer, this.upath, this.destPath, err);
    this.onError?.(this.failure);
  }

  // One write in flight per file: writes to one inode serialise on its lock
  // anyway; parallelism comes from several pulls.
  private writeNext(): void {
    const c = this.writeQueue.shift();
    if (!c) {
      this.checkIdle();
      return;
    }
    if (this.failure) {
      c.written = true;
      c.digested = true;
      this.settle(c);
      this.writeNext();
      return;
    }
    const t0 = inlineWrites.begin(this.o.writeMode);
    if (t0 >= 0) {
      try {
        writeAllSync(this.part.fd, c.buf, c.offset);
      } catch (err) {
        this.fail(err);
      }
      inlineWrites.done(t0, c.buf.length);
      c.written = true;
      this.settle(c);
      this.writeNext();
      return;
    }
    this.writing = true;
    const step = (off: number): void => {
      fsWrite(this.part.fd, c.buf, off, c.buf.length - off, c.offset + off, (err, n) => {
        if (!err && !this.failure && off + n < c.buf.length) return step(off + n);
        this.writing = false;
        if (err) this.fail(err);
        c.written = true;
        this.settle(c);
        this.writeNext();
      });
    };
    step(0);
  }

  private allWritten(): Promise<void> {
    if (!this.writing && this.writeQueue.length === 0) return Promise.resolve();
    return new Promise((resolve) => (this.idle = resolve));
  }

  /**
   * Every byte has been put: waits for the writes, verifies size and digest,
   * optionally fsyncs, renames into place. Rejects (temp file removed) on
   * any failure.
   */
  async finish(): Promise<{ bytes: number }> {
    try {
      await this.allWritten();
      if (this.failure) throw this.failure;
      // Bytes received but never digested would make the digest check meaningless.
      if (this.digestedTo !== this.received) {
        throw digestError(this.peer, this.upath, `size mismatch: expected ${this.expect.size} bytes, received ${this.received}`);
      }
      checkReceived(this.peer, this.upath, this.expect, this.received, this.crc);
      await this.part.land(this.o.fsync === true);
      return { bytes: this.received };
    } catch (err) {
      await this.abort();
      throw err;
    }
  }

  /** Stops: releases held chunks, waits for a write in flight (the fd must outlive it), removes the temp file. */
  async abort(): Promise<void> {
    this.failure ??= new DyadError('DYAD_EINTR', 0, 'sink aborted');
    for (const c of this.waitingDigest.values()) {
      c.digested = true;
      this.settle(c);
    }
    this.waitingDigest.clear();
    await this.allWritten();
    this.part.discard();
  }
}
