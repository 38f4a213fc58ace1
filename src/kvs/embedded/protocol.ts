/**
 * The embedded KVS wire protocol (docs/KVS.md has the full description).
 *
 * Each frame is a 4-byte big-endian header, then a payload of the length in
 * its low 31 bits. Usually the payload is UTF-8 JSON. JSON rather than a
 * binary encoding because metadata messages are a few hundred bytes, where
 * parsing costs far less than the round trip, and it keeps the protocol
 * debuggable with a hex dump. The length prefix lets the reader reject an
 * oversized frame from its header, before buffering it.
 *
 * File bytes pushed with a publication travel raw: with the header's top bit
 * set, the payload is a 4-byte big-endian JSON length, the JSON, then the
 * bytes, which the JSON names as [offset, length] pairs. Encoding and
 * decoding a change event with a 4 KiB file took 20 and 17 µs as base64
 * inside the JSON, 7 and 6 µs this way (a loop on the project VM): the
 * producer pays the first, every watching node the second.
 */
import { DyadError, errnos } from '../../errors.js';
import { protocolError } from '../errors.js';
import type { FileRecord } from '../types.js';

export const PROTOCOL = 'dyad-kvs/2';
/** The server's limit on client frames; everything a client sends is small. */
export const SERVER_MAX_FRAME_BYTES = 1 << 20;
/** The client's limit on server frames: list pages and change events can be larger. */
export const CLIENT_MAX_FRAME_BYTES = 16 << 20;
/** Page sizes chosen so a page stays well under CLIENT_MAX_FRAME_BYTES at the field limits. */
export const LIST_PAGE = 1000;
export const RANK_PAGE = 100;
export const NAMESPACE_PAGE = 5000;

/** First frame from the server. */
export interface HelloFrame {
  hello: typeof PROTOCOL;
  nonce: string;
  keyDepth: number;
  keyBins: number;
}

export interface WireError {
  code: string;
  /** errno by name: numbers differ between platforms. */
  errno: string;
  message: string;
}

export type ResponseFrame = { id: number; ok: true; res: unknown } | { id: number; ok: false; err: WireError };

export interface WireChange {
  path: string;
  rec: FileRecord | null;
  /** Pushed file content: [offset, length] in the frame's bytes. */
  bin?: [number, number];
}

/** Largest content a publisher may push with a publication. */
export const MAX_PUSHED_BYTES = 256 << 10;

/**
 * The raw bytes a message carries: set by FrameDecoder on a message that
 * came in a frame with bytes, and read by encodeFrame's callers that send
 * one (JSON.stringify leaves symbol keys out).
 */
export const BYTES = Symbol('dyad-kvs frame bytes');

export type Carrying = { [BYTES]?: Buffer };

/** The bytes that came with a decoded message, if any. */
export function bytesOf(m: unknown): Buffer | undefined {
  return typeof m === 'object' && m !== null ? (m as Carrying)[BYTES] : undefined;
}

/**
 * Pushed content named by `ref` ([offset, length]) in a frame's `bytes`, as
 * a copy (the frame may share its memory with others); DYAD_EPROTO when the
 * reference is malformed, out of bounds or too big.
 */
export function decodeContent(ref: unknown, bytes: Buffer | undefined): Buffer | undefined {
  if (ref === undefined || ref === null) return undefined;
  const ok =
    Array.isArray(ref) &&
    ref.length === 2 &&
    Number.isSafeInteger(ref[0]) &&
    Number.isSafeInteger(ref[1]) &&
    (ref[0] as number) >= 0 &&
    (ref[1] as number) >= 0 &&
    (ref[1] as number) <= MAX_PUSHED_BYTES &&
    bytes !== undefined &&
    (ref[0] as number) + (ref[1] as number) <= bytes.length;
  if (!ok) throw protocolError(`pushed content must be [offset, length] within the frame's bytes, at most ${MAX_PUSHED_BYTES} bytes`);
  const [off, len] = ref as [number, number];
  return Buffer.from(bytes.subarray(off, off + len));
}

export type EventFrame =
  | { ev: 'change'; ns: string; rev: number; changes: WireChange[] }
  | { ev: 'closed'; ns: string; err: WireError };

const WITH_BYTES = 0x8000_0000;

/** A frame for msg; with `bytes` (what its [offset, length] pairs name, in order), one that carries them raw. */
export function encodeFrame(msg: object, bytes?: readonly Uint8Array[]): Buffer {
  const json = JSON.stringify(msg);
  const len = Buffer.byteLength(json, 'utf8');
  if (bytes === undefined || bytes.length === 0) {
    const buf = Buffer.allocUnsafe(4 + len);
    buf.writeUInt32BE(len, 0);
    buf.write(json, 4, 'utf8');
    return buf;
  }
  let total = 0;
  for (const b of bytes) total += b.byteLength;
  const buf = Buffer.allocUnsafe(8 + len + total);
  buf.writeUInt32BE((4 + len + total + WITH_BYTES) >>> 0, 0);
  buf.writeUInt32BE(len, 4);
  buf.write(json, 8, 'utf8');
  let at = 8 + len;
  for (const b of bytes) {
    buf.set(b, at);
    at += b.byteLength;
  }
  return buf;
}

/** Incremental frame reader; push() throws DYAD_EPROTO on a frame it cannot accept. */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private size = 0;
  private need = -1;
  private withBytes = false;

  constructor(private readonly maxFrameBytes: number) {}

  push(chunk: Buffer): unknown[] {
    this.chunks.push(chunk);
    this.size += chunk.length;
    const out: unknown[] = [];
    for (;;) {
      if (this.need < 0) {
        if (this.size < 4) break;
        const head = this.take(4).readUInt32BE(0);
        const n = head & ~WITH_BYTES;
        if (n === 0) throw protocolError('empty frame');
        if (n > this.maxFrameBytes) throw protocolError(`frame of ${n} bytes exceeds the ${this.maxFrameBytes}-byte limit`);
        this.need = n;
        this.withBytes = head >= WITH_BYTES;
      }
      if (this.size < this.need) break;
      const payload = this.take(this.need);
      this.need = -1;
      let json = payload;
      let bytes: Buffer | undefined;
      if (this.withBytes) {
        const j = payload.length >= 4 ? payload.readUInt32BE(0) : -1;
        if (j < 0 || j > payload.length - 4) throw protocolError('frame with bytes has a bad JSON length');
        json = payload.subarray(4, 4 + j);
        bytes = payload.subarray(4 + j);
      }
      let m: unknown;
      try {
        m = JSON.parse(json.toString('utf8'));
      } catch {
        throw protocolError('frame is not valid JSON');
      }
      if (bytes !== undefined && typeof m === 'object' && m !== null) (m as Carrying)[BYTES] = bytes;
      out.push(m);
    }
    return out;
  }

  private take(n: number): Buffer {
    let head = this.chunks[0]!;
    if (head.length < n) {
      head = Buffer.concat(this.chunks, this.size);
      this.chunks = [head];
    }
    const out = head.subarray(0, n);
    if (head.length === n) this.chunks.shift();
    else this.chunks[0] = head.subarray(n);
    this.size -= n;
    return out;
  }
}

function errnoNameOf(errno: number): string {
  for (const [name, value] of Object.entries(errnos)) if (value === errno) return name;
  return 'EIO';
}

export function toWireError(err: unknown): WireError {
  if (err instanceof DyadError) return { code: err.code, errno: errnoNameOf(err.errno), message: err.message };
  return { code: 'DYAD_EIO', errno: 'EIO', message: 'internal KVS server error' };
}

export function fromWireError(w: unknown): DyadError {
  const o = (typeof w === 'object' && w !== null ? w : {}) as Partial<Record<keyof WireError, unknown>>;
  const code = typeof o.code === 'string' ? o.code : 'DYAD_EIO';
  const name = typeof o.errno === 'string' && o.errno in errnos ? (o.errno as keyof typeof errnos) : 'EIO';
  const message = typeof o.message === 'string' ? o.message : 'KVS server error';
  return new DyadError(code, errnos[name], message);
}

export function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
