/**
 * The embedded KVS's durable log: an append-only file of JSON entries with group
 * commit, so one fdatasync covers every entry appended while the previous batch
 * was being written, and a publication is acknowledged only once its batch is on
 * disk. Without fdatasync (the daemons' default) an entry is acknowledged once
 * written to the file, which survives the process but not the machine; such
 * writes are small and done synchronously.
 *
 * Record layout: u32 BE payload length, u32 BE CRC-32 of the payload, payload
 * (UTF-8 JSON). The CRC tells a torn final write (dropped with a warning) from
 * corruption in the middle of the file (refused: silently dropping later,
 * acknowledged records would be worse than not starting).
 */
import { constants, writeSync } from 'node:fs';
import { open, rename, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { crc32 } from 'node:zlib';
import type { DyadError } from '../../errors.js';
import { closedError, kvsError } from '../errors.js';
import type { JournalEntry, StorePersistence } from './store.js';

const HEADER_BYTES = 8;
/** Entries are small; a larger length can only be garbage. */
const MAX_RECORD_BYTES = 64 << 20;
const READ_CHUNK = 1 << 20;

export function encodeRecord(entry: unknown): Buffer {
  const json = JSON.stringify(entry);
  const len = Buffer.byteLength(json, 'utf8');
  const buf = Buffer.allocUnsafe(HEADER_BYTES + len);
  buf.write(json, HEADER_BYTES, 'utf8');
  buf.writeUInt32BE(len, 0);
  buf.writeUInt32BE(crc32(buf.subarray(HEADER_BYTES)), 4);
  return buf;
}

export interface JournalContents {
  entries: unknown[];
  /** Bytes of a torn final write that were ignored. */
  droppedBytes: number;
}

function corruptAt(file: string, offset: number, why: string): DyadError {
  return kvsError(
    'DYAD_EIO',
    'EIO',
    `KVS journal ${file} is corrupt at byte ${offset} (${why}); move it aside to start empty or restore a backup`,
  );
}

/** Reads every entry; a missing file is an empty journal. */
export async function readJournal(file: string): Promise<JournalContents> {
  let fh: FileHandle;
  try {
    fh = await open(file, 'r');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { entries: [], droppedBytes: 0 };
    throw err;
  }
  try {
    const size = (await fh.stat()).size;
    const entries: unknown[] = [];
    let buf = Buffer.alloc(0);
    let base = 0; // file offset of buf[0]
    let eof = false;
    const fill = async (need: number): Promise<void> => {
      while (buf.length < need && !eof) {
        const chunk = Buffer.allocUnsafe(Math.max(READ_CHUNK, need - buf.length));
        const { bytesRead } = await fh.read(chunk, 0, chunk.length, base + buf.length);
        if (bytesRead === 0) eof = true;
        buf = Buffer.concat([buf, chunk.subarray(0, bytesRead)]);
      }
    };
    for (;;) {
      await fill(HEADER_BYTES);
      if (buf.length === 0) return { entries, droppedBytes: 0 };
      const offset = base;
      let bad: string | undefined;
      let len = 0;
      if (buf.length < HEADER_BYTES) {
        bad = 'truncated header';
      } else {
        len = buf.readUInt32BE(0);
        if (len === 0 || len > MAX_RECORD_BYTES) bad = `implausible length ${len}`;
        else {
          await fill(HEADER_BYTES + len);
          if (buf.length < HEADER_BYTES + len) bad = 'truncated record';
          else if (crc32(buf.subarray(HEADER_BYTES, HEADER_BYTES + len)) !== buf.readUInt32BE(4)) bad = 'checksum mismatch';
        }
      }
      if (bad === undefined) {
        try {
          entries.push(JSON.parse(buf.subarray(HEADER_BYTES, HEADER_BYTES + len).toString('utf8')));
        } catch {
          throw corruptAt(file, offset, 'checksummed record is not JSON');
        }
        buf = buf.subarray(HEADER_BYTES + len);
        base += HEADER_BYTES + len;
        continue;
      }
      // A torn append leaves a short last record or zeros; anything else is damage.
      const recordEnd = offset + HEADER_BYTES + len;
      if (bad === 'truncated header' || bad === 'truncated record' || (bad === 'checksum mismatch' && recordEnd >= size)) {
        return { entries, droppedBytes: size - offset };
      }
      if (await onlyZerosFrom(fh, offset, size)) return { entries, droppedBytes: size - offset };
      throw corruptAt(file, offset, bad);
    }
  } finally {
    await fh.close();
  }
}

async function onlyZerosFrom(fh: FileHandle, from: number, size: number): Promise<boolean> {
  const chunk = Buffer.allocUnsafe(READ_CHUNK);
  for (let pos = from; pos < size; ) {
    const { bytesRead } = await fh.read(chunk, 0, chunk.length, pos);
    if (bytesRead === 0) break;
    for (let i = 0; i < bytesRead; i++) if (chunk[i] !== 0) return false;
    pos += bytesRead;
  }
  return true;
}

function writeAllSync(fd: number, buf: Buffer): void {
  for (let off = 0; off < buf.length; ) off += writeSync(fd, buf, off, buf.length - off);
}

async function writeAll(fh: FileHandle, buf: Buffer): Promise<void> {
  for (let off = 0; off < buf.length; ) {
    const { bytesWritten } = await fh.write(buf, off, buf.length - off, null);
    off += bytesWritten;
  }
}

async function syncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Atomically replaces `file` with these entries (compaction). */
export async function writeSnapshot(file: string, entries: Iterable<JournalEntry>, fsync = true): Promise<void> {
  const tmp = `${file}.compact`;
  const fh = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC, 0o600);
  try {
    let batch: Buffer[] = [];
    let bytes = 0;
    for (const e of entries) {
      const rec = encodeRecord(e);
      batch.push(rec);
      bytes += rec.length;
      if (bytes >= READ_CHUNK) {
        await writeAll(fh, Buffer.concat(batch, bytes));
        batch = [];
        bytes = 0;
      }
    }
    if (bytes > 0) await writeAll(fh, Buffer.concat(batch, bytes));
    if (fsync) await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, file);
  if (fsync) await syncDir(dirname(file));
}

export interface JournalOptions {
  /** fdatasync each batch before acknowledging it (default true). */
  fsync?: boolean;
}

interface Ack {
  resolve(): void;
  reject(err: DyadError): void;
}

export class Journal implements StorePersistence {
  failure: DyadError | undefined;
  private queue: Buffer[] = [];
  private acks: Ack[] = [];
  private running = false;
  private closed = false;
  private idle: Array<() => void> = [];

  private constructor(
    readonly file: string,
    private readonly fh: FileHandle,
    private readonly fsync: boolean,
  ) {}

  static async openAppend(file: string, opts: JournalOptions = {}): Promise<Journal> {
    const fh = await open(file, constants.O_WRONLY | constants.O_CREAT | constants.O_APPEND, 0o600);
    return new Journal(file, fh, opts.fsync ?? true);
  }

  append(entry: JournalEntry): Promise<void> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    if (this.closed) return Promise.reject(closedError('KVS journal'));
    if (!this.fsync && !this.running) {
      // Without fdatasync the entry only has to reach the page cache: a
      // write of a few hundred bytes, done at once instead of through the
      // thread pool, whose round trip would sit in every publisher's close().
      try {
        writeAllSync(this.fh.fd, encodeRecord(entry));
        return Promise.resolve();
      } catch (err) {
        return Promise.reject(this.fail(err, []));
      }
    }
    this.queue.push(encodeRecord(entry));
    const done = new Promise<void>((resolve, reject) => this.acks.push({ resolve, reject }));
    this.kick();
    return done;
  }

  /** Flushes what is queued, then closes the file; later appends are refused. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.running || this.queue.length > 0) await new Promise<void>((resolve) => this.idle.push(resolve));
    await this.fh.close();
  }

  /** The journal cannot be written: reject these and everything queued, and refuse what follows. */
  private fail(err: unknown, acks: Ack[]): DyadError {
    this.failure = kvsError(
      'DYAD_EIO',
      'EIO',
      `KVS journal ${this.file} could not be written (${(err as Error).message}); the server accepts no further changes`,
      err,
    );
    const rejected = [...acks, ...this.acks];
    this.queue = [];
    this.acks = [];
    for (const a of rejected) a.reject(this.failure);
    return this.failure;
  }

  private kick(): void {
    if (this.running) return;
    this.running = true;
    void this.drain().then(() => {
      this.running = false;
      if (this.queue.length > 0 && this.failure === undefined) {
        this.kick();
        return;
      }
      const idle = this.idle;
      this.idle = [];
      for (const fn of idle) fn();
    });
  }

  private async drain(): Promise<void> {
    // Let appends made in the same turn of the event loop join this batch.
    await new Promise<void>((resolve) => setImmediate(resolve));
    while (this.queue.length > 0) {
      const batch = this.queue;
      const acks = this.acks;
      this.queue = [];
      this.acks = [];
      try {
        await writeAll(this.fh, batch.length === 1 ? batch[0]! : Buffer.concat(batch));
        if (this.fsync) await this.fh.datasync();
      } catch (err) {
        this.fail(err, acks);
        return;
      }
      for (const a of acks) a.resolve();
    }
  }
}
