/**
 * The embedded KVS wire protocol (docs/KVS.md has the full description).
 *
 * Each frame is a 4-byte big-endian payload length followed by that many bytes of
 * UTF-8 JSON. JSON rather than a binary encoding because metadata messages are a
 * few hundred bytes, where parsing costs far less than the round trip, and it keeps
 * the protocol debuggable with a hex dump. The length prefix lets the reader reject
 * an oversized frame from its header, before buffering it.
 */
import { DyadError, errnos } from '../../errors.js';
import { protocolError } from '../errors.js';
import type { FileRecord } from '../types.js';

export const PROTOCOL = 'dyad-kvs/1';
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
  /** Pushed file content, base64. */
  data?: string;
}

/** Largest content a publisher may push with a publication (it travels in JSON frames). */
export const MAX_PUSHED_BYTES = 256 << 10;

/** Decodes pushed content; DYAD_EPROTO when it is not base64 or is too big. */
export function decodeContent(v: unknown): Buffer | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string' || v.length > Math.ceil(MAX_PUSHED_BYTES / 3) * 4 || !/^[A-Za-z0-9+/]*={0,2}$/.test(v)) {
    throw protocolError(`pushed content must be base64 of at most ${MAX_PUSHED_BYTES} bytes`);
  }
  return Buffer.from(v, 'base64');
}

export type EventFrame =
  | { ev: 'change'; ns: string; rev: number; changes: WireChange[] }
  | { ev: 'closed'; ns: string; err: WireError };

export function encodeFrame(msg: object): Buffer {
  const json = JSON.stringify(msg);
  const len = Buffer.byteLength(json, 'utf8');
  const buf = Buffer.allocUnsafe(4 + len);
  buf.writeUInt32BE(len, 0);
  buf.write(json, 4, 'utf8');
  return buf;
}

/** Incremental frame reader; push() throws DYAD_EPROTO on a frame it cannot accept. */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private size = 0;
  private need = -1;

  constructor(private readonly maxFrameBytes: number) {}

  push(chunk: Buffer): unknown[] {
    this.chunks.push(chunk);
    this.size += chunk.length;
    const out: unknown[] = [];
    for (;;) {
      if (this.need < 0) {
        if (this.size < 4) break;
        const n = this.take(4).readUInt32BE(0);
        if (n === 0) throw protocolError('empty frame');
        if (n > this.maxFrameBytes) throw protocolError(`frame of ${n} bytes exceeds the ${this.maxFrameBytes}-byte limit`);
        this.need = n;
      }
      if (this.size < this.need) break;
      const payload = this.take(this.need);
      this.need = -1;
      try {
        out.push(JSON.parse(payload.toString('utf8')));
      } catch {
        throw protocolError('frame is not valid JSON');
      }
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
