/**
 * Wire format of the TCP transfer protocol, version 1.
 *
 * Control frames:  u32 BE payload length | u8 type | payload
 * A payload longer than MAX_PAYLOAD, or an unknown type, is a protocol
 * violation and closes that connection only.
 *
 * Connection setup (mutual HMAC-SHA256 challenge-response, once per
 * connection, then the connection is kept alive and reused):
 *   S->C HELLO   "DYAD" | u8 version | 32-byte server nonce
 *   C->S AUTH    u8 version | 32-byte client nonce | HMAC(secret, "dyad-dtl-tcp/1 client" | sn | cn)
 *   S->C WELCOME HMAC(secret, "dyad-dtl-tcp/1 server" | sn | cn)
 *     or DENIED  utf8 reason, then the server closes.
 * The server's MAC lets the client know the bytes it is about to trust come
 * from a node holding the secret, not from whatever squats on the port.
 *
 * Requests (one at a time per connection; the client pools connections):
 *   C->S GET     u32 request id | utf8 upath
 *   S->C DATA    u32 request id | u32 size high | u32 size low, then exactly
 *                `size` raw body bytes, unframed, so the receiver can read
 *                them straight into its file buffers. A server that cannot
 *                deliver all of them (file shrank, read error) closes the
 *                connection; the client sees a short body and fails.
 *     or ERROR   u32 request id | u8 status (errors.ts RemoteStatus) | utf8 detail
 */
import { createHmac, timingSafeEqual } from 'node:crypto';

export const PROTOCOL_VERSION = 1;
export const MAGIC = Buffer.from('DYAD', 'latin1');
export const NONCE_BYTES = 32;
export const MAC_BYTES = 32;
export const FRAME_HEADER_BYTES = 5;
/** Big enough for a GET of a PATH_MAX upath; nothing legitimate is larger. */
export const MAX_PAYLOAD = 8192;
export const DATA_HEADER_BYTES = FRAME_HEADER_BYTES + 12;

export const FrameType = {
  hello: 1,
  auth: 2,
  welcome: 3,
  denied: 4,
  get: 16,
  data: 17,
  error: 18,
} as const;

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
 * ProtocolError if the header announces an oversized or unknown frame (so a
 * hostile length is rejected before any of it is buffered).
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

/** Reassembles frames from arbitrary chunks (server side; requests are small). */
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

export function encodeHello(serverNonce: Buffer): Buffer {
  return encodeFrame(FrameType.hello, MAGIC, Uint8Array.of(PROTOCOL_VERSION), serverNonce);
}

export function decodeHello(p: Buffer): { version: number; nonce: Buffer } {
  if (p.length !== 4 + 1 + NONCE_BYTES || !p.subarray(0, 4).equals(MAGIC)) {
    throw new ProtocolError('not a dyad-fs transfer server (bad HELLO)');
  }
  return { version: p[4]!, nonce: p.subarray(5) };
}

export function authMac(secret: Buffer, role: 'client' | 'server', serverNonce: Uint8Array, clientNonce: Uint8Array): Buffer {
  return createHmac('sha256', secret)
    .update(`dyad-dtl-tcp/${PROTOCOL_VERSION} ${role}`)
    .update(serverNonce)
    .update(clientNonce)
    .digest();
}

export function macEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

export function encodeAuth(clientNonce: Buffer, mac: Buffer): Buffer {
  return encodeFrame(FrameType.auth, Uint8Array.of(PROTOCOL_VERSION), clientNonce, mac);
}

export function decodeAuth(p: Buffer): { version: number; nonce: Buffer; mac: Buffer } {
  if (p.length !== 1 + NONCE_BYTES + MAC_BYTES) throw new ProtocolError('bad AUTH frame');
  return { version: p[0]!, nonce: p.subarray(1, 1 + NONCE_BYTES), mac: p.subarray(1 + NONCE_BYTES) };
}

export function encodeGet(id: number, upath: string): Buffer {
  const path = Buffer.from(upath, 'utf8');
  const len = 4 + path.length;
  if (len > MAX_PAYLOAD) throw new ProtocolError(`upath of ${path.length} bytes is too long`);
  const out = Buffer.allocUnsafe(FRAME_HEADER_BYTES + len);
  out.writeUInt32BE(len, 0);
  out[4] = FrameType.get;
  out.writeUInt32BE(id >>> 0, 5);
  path.copy(out, 9);
  return out;
}

export function decodeGet(p: Buffer): { id: number; upath: string } {
  if (p.length < 4) throw new ProtocolError('bad GET frame');
  return { id: p.readUInt32BE(0), upath: p.toString('utf8', 4) };
}

/** Writes a DATA header into out[0..DATA_HEADER_BYTES), so small replies go out as one buffer. */
export function writeDataHeader(out: Buffer, id: number, size: number): void {
  out.writeUInt32BE(12, 0);
  out[4] = FrameType.data;
  out.writeUInt32BE(id >>> 0, 5);
  out.writeUInt32BE(Math.floor(size / 0x100000000), 9);
  out.writeUInt32BE(size >>> 0, 13);
}

export function decodeData(p: Buffer): { id: number; size: number } {
  if (p.length !== 12) throw new ProtocolError('bad DATA frame');
  const size = p.readUInt32BE(4) * 0x100000000 + p.readUInt32BE(8);
  if (!Number.isSafeInteger(size)) throw new ProtocolError('DATA size out of range');
  return { id: p.readUInt32BE(0), size };
}

export function encodeError(id: number, status: number, detail: string): Buffer {
  const head = Buffer.allocUnsafe(5);
  head.writeUInt32BE(id >>> 0, 0);
  head[4] = status;
  let d = Buffer.from(detail, 'utf8');
  if (d.length > MAX_PAYLOAD - 5) d = d.subarray(0, MAX_PAYLOAD - 5);
  return encodeFrame(FrameType.error, head, d);
}

export function decodeError(p: Buffer): { id: number; status: number; detail: string } {
  if (p.length < 5) throw new ProtocolError('bad ERROR frame');
  return { id: p.readUInt32BE(0), status: p[4]!, detail: p.toString('utf8', 5) };
}

/** Splits "host:port" / "[v6]:port" as reported by TransferServer.address. */
export function parseAddress(address: string): { host: string; port: number } {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(address) ?? /^([^:]+):(\d+)$/.exec(address);
  const port = m ? Number(m[2]) : NaN;
  if (!m || !Number.isInteger(port) || port <= 0 || port > 65535) {
    throw new ProtocolError(`bad peer address ${JSON.stringify(address)}: expected host:port`);
  }
  return { host: m[1]!, port };
}

export function formatAddress(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}
