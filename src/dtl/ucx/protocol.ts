/**
 * Wire format of the UCX backend, version 1: a small TCP control connection
 * per peer (authentication, requests, small files, errors) beside UCX for
 * the bulk data. Kept separate from the TCP backend's protocol so the two
 * can evolve independently; the framing and the HMAC handshake follow the
 * same pattern.
 *
 * Why TCP for control rather than UCX active messages: the owner must know
 * who it is talking to (an authenticated connection with a lifetime), when
 * that consumer goes away (to stop sending and free buffers), and must not
 * keep per-endpoint state for unauthenticated UCX peers. A TCP connection
 * gives all three for free, and a request costs the same round trip either
 * way; small files ride in the reply just as with the TCP backend.
 *
 * Control frames:  u32 BE payload length | u8 type | payload
 *
 * Connection setup (once per connection, then kept alive and multiplexed):
 *   S->C HELLO   "DYUX" | u8 version | 32-byte server nonce
 *   C->S AUTH    u8 version | 32-byte client nonce | 32-byte MAC | client UCX worker address
 *   S->C WELCOME 32-byte MAC | server UCX worker address
 *     or DENIED  utf8 reason, then close.
 *   MACs are HMAC-SHA256(secret, "dyad-dtl-ucx/1 client|server" | sn | cn |
 *   that side's worker address), so neither address can be swapped in flight.
 *
 * Requests (many in flight per connection, matched by id):
 *   C->S GET     u32 id | u8 mode | 8-byte token | utf8 upath
 *                mode 0: the owner sends the chunks as UCX active messages
 *                (rendezvous); mode 1: the consumer reads them with ucp_get.
 *                The token, random per pull, names the pull in chunk headers.
 *   S->C DATA    u32 id | u64 size | the whole file (size <= INLINE_MAX)
 *   S->C START   u32 id | u64 size | u32 chunk bytes | u16 window
 *                [mode 1: | u64 remote address | packed rkey]
 *   S->C ERROR   u32 id | u8 status (errors.ts RemoteStatus) | utf8 detail
 *                (may follow START: the owner stopped mid-file)
 *   S->C WAIT    u32 id: every WAIT_INTERVAL_MS while the request waits for
 *                one of the owner's transfer slots, so a busy owner is not
 *                mistaken for a silent one
 *   C->S END     u32 id: the consumer needs nothing more for this request
 *                (done or gave up); mode 1 frees the owner's mapping.
 *
 * Chunks (mode 0), active message AM_CHUNK to the consumer's worker:
 *   header = 8-byte token | u64 offset; payload = the chunk's bytes.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';

export const PROTOCOL_VERSION = 1;
export const MAGIC = Buffer.from('DYUX', 'latin1');
export const NONCE_BYTES = 32;
export const MAC_BYTES = 32;
export const TOKEN_BYTES = 8;
export const FRAME_HEADER_BYTES = 5;
/** Files up to this size travel in the DATA reply: one round trip, no UCX. */
export const INLINE_MAX = 64 << 10;
export const MAX_PAYLOAD = INLINE_MAX + 64;
/** Longest worker address or rkey accepted (InfiniBand addresses run to ~1 KiB). */
export const MAX_BLOB = 8192;
export const AM_CHUNK = 0x44;
/**
 * 512 KiB x 8 in flight measured best on the project VM (bench/transfer-ucx.ts:
 * 1.2x the TCP backend, against 0.65x for 1 MiB x 8 and ~0.6x for 4 MiB x 4
 * in the same runs): the consumer digests each chunk while it is still in
 * cache, and its event loop is never blocked for long by one chunk's digest
 * and write. On InfiniBand 512 KiB messages already run near line rate.
 *
 * A consumer reserves its chunk buffers for this size when it starts.
 */
export const DEFAULT_CHUNK_BYTES = 512 << 10;
export const DEFAULT_WINDOW = 8;
export const CHUNK_HEADER_BYTES = TOKEN_BYTES + 8;

export const Mode = { am: 0, get: 1 } as const;
export type ModeCode = (typeof Mode)[keyof typeof Mode];

export const FrameType = {
  hello: 1,
  auth: 2,
  welcome: 3,
  denied: 4,
  get: 16,
  data: 17,
  error: 18,
  start: 19,
  end: 20,
  wait: 21,
} as const;

export const WAIT_INTERVAL_MS = 1000;

const KNOWN_TYPES = new Set<number>(Object.values(FrameType));

export class ProtocolError extends Error {
  override name = 'ProtocolError';
}

export interface Frame {
  type: number;
  payload: Buffer;
}

export function encodeFrame(type: number, ...parts: Uint8Array[]): Buffer {
  let len = 0;
  for (const p of parts) len += p.length;
  if (len > MAX_PAYLOAD) throw new ProtocolError(`frame payload ${len} bytes exceeds ${MAX_PAYLOAD}`);
  const out = Buffer.allocUnsafe(FRAME_HEADER_BYTES + len);
  out.writeUInt32BE(len, 0);
  out[4] = type;
  let o = FRAME_HEADER_BYTES;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/**
 * Parses one frame at buf[off..end). Returns null if incomplete; throws
 * ProtocolError for an oversized or unknown frame before any of it is buffered.
 */
export function parseFrame(buf: Buffer, off: number, end: number): { frame: Frame; next: number } | null {
  if (end - off < FRAME_HEADER_BYTES) return null;
  const len = buf.readUInt32BE(off);
  const type = buf[off + 4]!;
  if (len > MAX_PAYLOAD) throw new ProtocolError(`frame payload ${len} bytes exceeds ${MAX_PAYLOAD}`);
  if (!KNOWN_TYPES.has(type)) throw new ProtocolError(`unknown frame type ${type}`);
  const next = off + FRAME_HEADER_BYTES + len;
  if (next > end) return null;
  return { frame: { type, payload: buf.subarray(off + FRAME_HEADER_BYTES, next) }, next };
}

/** Reassembles frames from socket chunks (server side). */
export class FrameReader {
  private pending: Buffer | null = null;
  push(chunk: Buffer): Frame[] {
    const buf = this.pending ? Buffer.concat([this.pending, chunk]) : chunk;
    const frames: Frame[] = [];
    let off = 0;
    for (;;) {
      const r = parseFrame(buf, off, buf.length);
      if (!r) break;
      frames.push(r.frame);
      off = r.next;
    }
    // Copy the tail so a retained slice does not pin a large socket chunk.
    this.pending = off < buf.length ? Buffer.from(buf.subarray(off)) : null;
    return frames;
  }
}

function u64(n: number): Buffer {
  const b = Buffer.allocUnsafe(8);
  b.writeUInt32BE(Math.floor(n / 0x100000000), 0);
  b.writeUInt32BE(n >>> 0, 4);
  return b;
}

function readU64(p: Buffer, off: number): number {
  const n = p.readUInt32BE(off) * 0x100000000 + p.readUInt32BE(off + 4);
  if (!Number.isSafeInteger(n)) throw new ProtocolError('size out of range');
  return n;
}

function u32(n: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(n >>> 0, 0);
  return b;
}

export function authMac(secret: Buffer, role: 'client' | 'server', serverNonce: Uint8Array, clientNonce: Uint8Array, workerAddress: Uint8Array): Buffer {
  return createHmac('sha256', secret)
    .update(`dyad-dtl-ucx/${PROTOCOL_VERSION} ${role}`)
    .update(serverNonce)
    .update(clientNonce)
    .update(workerAddress)
    .digest();
}

export function macEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

export function encodeHello(nonce: Buffer): Buffer {
  return encodeFrame(FrameType.hello, MAGIC, Uint8Array.of(PROTOCOL_VERSION), nonce);
}

export function decodeHello(p: Buffer): { version: number; nonce: Buffer } {
  if (p.length !== 4 + 1 + NONCE_BYTES || !p.subarray(0, 4).equals(MAGIC)) {
    throw new ProtocolError('not a dyad-fs UCX transfer server (bad HELLO)');
  }
  return { version: p[4]!, nonce: p.subarray(5) };
}

export function encodeAuth(nonce: Buffer, mac: Buffer, workerAddress: Buffer): Buffer {
  return encodeFrame(FrameType.auth, Uint8Array.of(PROTOCOL_VERSION), nonce, mac, workerAddress);
}

export function decodeAuth(p: Buffer): { version: number; nonce: Buffer; mac: Buffer; workerAddress: Buffer } {
  const fixed = 1 + NONCE_BYTES + MAC_BYTES;
  if (p.length <= fixed || p.length - fixed > MAX_BLOB) throw new ProtocolError('bad AUTH frame');
  return {
    version: p[0]!,
    nonce: p.subarray(1, 1 + NONCE_BYTES),
    mac: p.subarray(1 + NONCE_BYTES, fixed),
    workerAddress: p.subarray(fixed),
  };
}

export function encodeWelcome(mac: Buffer, workerAddress: Buffer): Buffer {
  return encodeFrame(FrameType.welcome, mac, workerAddress);
}

export function decodeWelcome(p: Buffer): { mac: Buffer; workerAddress: Buffer } {
  if (p.length <= MAC_BYTES || p.length - MAC_BYTES > MAX_BLOB) throw new ProtocolError('bad WELCOME frame');
  return { mac: p.subarray(0, MAC_BYTES), workerAddress: p.subarray(MAC_BYTES) };
}

export function encodeGet(id: number, mode: ModeCode, token: Buffer, upath: string): Buffer {
  const path = Buffer.from(upath, 'utf8');
  if (path.length > 8192) throw new ProtocolError(`upath of ${path.length} bytes is too long`);
  const head = Buffer.allocUnsafe(5);
  head.writeUInt32BE(id >>> 0, 0);
  head[4] = mode;
  return encodeFrame(FrameType.get, head, token, path);
}

export function decodeGet(p: Buffer): { id: number; mode: number; token: Buffer; upath: string } {
  if (p.length < 5 + TOKEN_BYTES) throw new ProtocolError('bad GET frame');
  return { id: p.readUInt32BE(0), mode: p[4]!, token: p.subarray(5, 5 + TOKEN_BYTES), upath: p.toString('utf8', 5 + TOKEN_BYTES) };
}

export function encodeData(id: number, body: Uint8Array): Buffer {
  return encodeFrame(FrameType.data, u32(id), u64(body.length), body);
}

export function decodeData(p: Buffer): { id: number; size: number; body: Buffer } {
  if (p.length < 12) throw new ProtocolError('bad DATA frame');
  const size = readU64(p, 4);
  if (p.length - 12 !== size) throw new ProtocolError(`DATA frame announces ${size} bytes, carries ${p.length - 12}`);
  return { id: p.readUInt32BE(0), size, body: p.subarray(12) };
}

export interface Start {
  id: number;
  size: number;
  chunkBytes: number;
  window: number;
  remote?: { address: bigint; rkey: Buffer };
}

export function encodeStart(s: Start): Buffer {
  const head = Buffer.allocUnsafe(4 + 8 + 4 + 2);
  head.writeUInt32BE(s.id >>> 0, 0);
  u64(s.size).copy(head, 4);
  head.writeUInt32BE(s.chunkBytes >>> 0, 12);
  head.writeUInt16BE(s.window, 16);
  if (!s.remote) return encodeFrame(FrameType.start, head);
  const addr = Buffer.allocUnsafe(8);
  addr.writeBigUInt64BE(s.remote.address);
  return encodeFrame(FrameType.start, head, addr, s.remote.rkey);
}

export function decodeStart(p: Buffer): Start {
  if (p.length < 18) throw new ProtocolError('bad START frame');
  const s: Start = { id: p.readUInt32BE(0), size: readU64(p, 4), chunkBytes: p.readUInt32BE(12), window: p.readUInt16BE(16) };
  if (s.chunkBytes === 0 || s.window === 0) throw new ProtocolError('START with a zero chunk size or window');
  if (p.length > 18) {
    if (p.length < 27 || p.length - 26 > MAX_BLOB) throw new ProtocolError('bad START remote key');
    s.remote = { address: p.readBigUInt64BE(18), rkey: p.subarray(26) };
  }
  return s;
}

export function encodeError(id: number, status: number, detail: string): Buffer {
  const head = Buffer.allocUnsafe(5);
  head.writeUInt32BE(id >>> 0, 0);
  head[4] = status;
  let d = Buffer.from(detail, 'utf8');
  if (d.length > 4096) d = d.subarray(0, 4096);
  return encodeFrame(FrameType.error, head, d);
}

export function decodeError(p: Buffer): { id: number; status: number; detail: string } {
  if (p.length < 5) throw new ProtocolError('bad ERROR frame');
  return { id: p.readUInt32BE(0), status: p[4]!, detail: p.toString('utf8', 5) };
}

export function encodeWait(id: number): Buffer {
  return encodeFrame(FrameType.wait, u32(id));
}

export function encodeEnd(id: number): Buffer {
  return encodeFrame(FrameType.end, u32(id));
}

export function decodeEnd(p: Buffer): number {
  if (p.length !== 4) throw new ProtocolError('bad END frame');
  return p.readUInt32BE(0);
}

export function encodeChunkHeader(token: Buffer, offset: number): Buffer {
  const h = Buffer.allocUnsafe(CHUNK_HEADER_BYTES);
  token.copy(h, 0);
  u64(offset).copy(h, TOKEN_BYTES);
  return h;
}

export function decodeChunkHeader(h: Buffer): { token: string; offset: number } | null {
  if (h.length !== CHUNK_HEADER_BYTES) return null;
  const offset = h.readUInt32BE(TOKEN_BYTES) * 0x100000000 + h.readUInt32BE(TOKEN_BYTES + 4);
  return { token: h.toString('hex', 0, TOKEN_BYTES), offset };
}

/**
 * TransferServer.address of this backend: "ucx://host:port#<worker address,
 * base64url>". The control connection uses host:port. The fragment records
 * which UCX worker served it (useful in `dyad` listings and to tell a
 * restarted daemon apart); the address actually connected to arrives in the
 * authenticated WELCOME. A bare "host:port" is accepted as well.
 */
export function formatAddress(host: string, port: number, workerAddress: Buffer): string {
  const hp = host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
  return `ucx://${hp}#${workerAddress.toString('base64url')}`;
}

export function parseAddress(address: string): { host: string; port: number; workerAddress?: Buffer } {
  let rest = address;
  let worker: Buffer | undefined;
  if (rest.startsWith('ucx://')) {
    rest = rest.slice(6);
    const hash = rest.indexOf('#');
    if (hash >= 0) {
      worker = Buffer.from(rest.slice(hash + 1), 'base64url');
      rest = rest.slice(0, hash);
    }
  }
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(rest) ?? /^([^:/]+):(\d+)$/.exec(rest);
  const port = m ? Number(m[2]) : NaN;
  if (!m || !Number.isInteger(port) || port <= 0 || port > 65535) {
    throw new ProtocolError(`bad peer address ${JSON.stringify(address)}: expected ucx://host:port#worker or host:port`);
  }
  return worker ? { host: m[1]!, port, workerAddress: worker } : { host: m[1]!, port };
}
