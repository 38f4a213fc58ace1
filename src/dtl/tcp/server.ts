/**
 * The owner side of the TCP transfer: authenticates each connection and
 * streams requested files out of the storage root.
 *
 * Where DYAD's module reads a whole file into one buffer and serves requests
 * one at a time on its reactor, here every connection is served
 * independently (requests on one connection in order, connections
 * concurrently). A large body goes out with sendfile(2) (sendfile.ts): page
 * cache to socket, no copy through JavaScript, with the socket's own flow
 * control as backpressure. Where sendfile does not work it streams from the
 * file in 1 MiB chunks with at most a few chunks per transfer in memory:
 * reads run ahead of the socket by up to chunksInFlight chunks and wait for
 * it when the consumer is slower than the disk. Chunks are read inline while
 * reads are fast (page cache) and on the thread pool otherwise (inline.ts).
 *
 * Small files (<= SMALL_FILE_BYTES) take a synchronous path: open, fstat,
 * one read into a buffer that already holds the reply header, one socket
 * write. On this VM a thread-pool hop costs more than those syscalls.
 */
import { closeSync, fstatSync, readSync } from 'node:fs';
import { readAt } from '../io.js';
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { ConfigError, DyadError, errnoName, errnoOf, errnos } from '../../errors.js';
import { openBeneath } from '../confine.js';
import { inlineReads, type IoMode } from '../inline.js';
import { RemoteStatus } from '../errors.js';
import type { ServeOptions, TransferServer } from '../types.js';
import { BufferPool } from '../buffers.js';
import { sendRange, sendfileAvailable, type RangeSend } from '../sendfile.js';
import {
  DATA_HEADER_BYTES,
  FrameReader,
  FrameType,
  NONCE_BYTES,
  PROTOCOL_VERSION,
  authMac,
  decodeAuth,
  decodeGet,
  encodeError,
  encodeFrame,
  encodeHello,
  formatAddress,
  macEqual,
  writeDataHeader,
  type Frame,
} from './protocol.js';

export const SMALL_FILE_BYTES = 64 << 10;

export interface TcpServeOptions extends ServeOptions {
  /** Read size for large files. */
  chunkBytes?: number;
  /** Chunks of one transfer in memory at once (read ahead of the socket). */
  chunksInFlight?: number;
  /** Where large-file chunks are read; see inline.ts. Default 'adaptive'. */
  readMode?: IoMode;
  maxConnections?: number;
  /** A connection that has not authenticated by then is dropped. */
  authTimeoutMs?: number;
  /** An authenticated connection silent this long is dropped. */
  idleTimeoutMs?: number;
  /** Requests a client may pipeline on one connection before it is dropped. */
  maxQueuedRequests?: number;
  log?: (msg: string) => void;
}

interface Settings {
  root: string;
  secret: Buffer;
  chunkBytes: number;
  chunksInFlight: number;
  readMode: IoMode;
  authTimeoutMs: number;
  idleTimeoutMs: number;
  maxQueued: number;
  pool: BufferPool;
  log: (msg: string) => void;
}

function statusOf(err: unknown): { status: number; detail: string } {
  if (err instanceof DyadError && err.code === 'DYAD_EFORBIDDEN') {
    return { status: RemoteStatus.forbidden, detail: err.message };
  }
  const errno = errnoOf(err);
  if (errno === errnos.ENOENT || errno === errnos.ENOTDIR) return { status: RemoteStatus.notFound, detail: 'no such file' };
  return { status: RemoteStatus.io, detail: `${errnoName(errno)}: ${err instanceof Error ? err.message : String(err)}` };
}

/** Thrown inside a transfer when the connection went away; ends it quietly. */
class ConnectionGone extends Error {}

class ServerConnection {
  private readonly reader = new FrameReader();
  private readonly nonce = randomBytes(NONCE_BYTES);
  private authed = false;
  private dead = false;
  private busy = false;
  private readonly queue: { id: number; upath: string }[] = [];
  // Wakes a transfer waiting for a chunk to drain (or for the socket to die).
  private wake: (() => void) | null = null;
  // A body being sent by sendfile, cancelled if the connection is dropped.
  private sending: RangeSend | null = null;

  constructor(
    private readonly sock: net.Socket,
    private readonly s: Settings,
  ) {
    sock.setNoDelay(true);
    sock.setTimeout(s.authTimeoutMs);
    sock.on('timeout', () => this.drop(this.authed ? 'idle timeout' : 'no AUTH in time'));
    sock.on('error', () => this.drop());
    sock.on('close', () => this.drop());
    sock.on('data', (chunk: Buffer) => this.onData(chunk));
    sock.write(encodeHello(this.nonce));
  }

  drop(why?: string): void {
    if (why && !this.dead) this.s.log(`transfer server: dropping ${this.sock.remoteAddress}:${this.sock.remotePort}: ${why}`);
    this.dead = true;
    this.sending?.cancel();
    this.queue.length = 0;
    this.sock.destroy();
    this.wakeUp();
  }

  private wakeUp(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  private onData(chunk: Buffer): void {
    if (this.dead) return;
    let frames: Frame[];
    try {
      frames = this.reader.push(chunk);
    } catch (err) {
      this.drop(err instanceof Error ? err.message : String(err));
      return;
    }
    for (const f of frames) {
      if (this.dead) return;
      this.onFrame(f);
    }
  }

  private onFrame(f: Frame): void {
    if (!this.authed) {
      if (f.type !== FrameType.auth) return this.drop('request before AUTH');
      let ok = false;
      try {
        const a = decodeAuth(f.payload);
        ok = a.version === PROTOCOL_VERSION && macEqual(a.mac, authMac(this.s.secret, 'client', this.nonce, a.nonce));
        if (ok) {
          this.authed = true;
          this.sock.setTimeout(this.s.idleTimeoutMs);
          this.sock.write(encodeFrame(FrameType.welcome, authMac(this.s.secret, 'server', this.nonce, a.nonce)));
        }
      } catch {
        ok = false;
      }
      if (!ok) {
        this.s.log(`transfer server: authentication failed from ${this.sock.remoteAddress}`);
        this.dead = true;
        this.sock.end(encodeFrame(FrameType.denied, Buffer.from('authentication failed')));
        // end() flushes DENIED; do not let a client hold the socket half-open.
        setTimeout(() => this.sock.destroy(), 1000).unref();
      }
      return;
    }
    if (f.type !== FrameType.get) return this.drop(`unexpected frame type ${f.type}`);
    let req: { id: number; upath: string };
    try {
      req = decodeGet(f.payload);
    } catch (err) {
      return this.drop(err instanceof Error ? err.message : String(err));
    }
    if (this.queue.length >= this.s.maxQueued) return this.drop('too many pipelined requests');
    this.queue.push(req);
    this.pump();
  }

  private pump(): void {
    if (this.busy || this.dead) return;
    const req = this.queue.shift();
    if (!req) return;
    this.busy = true;
    this.serve(req.id, req.upath).then(
      () => {
        this.busy = false;
        this.pump();
      },
      (err: unknown) => {
        this.busy = false;
        if (!(err instanceof ConnectionGone)) this.drop(`serving ${JSON.stringify(req.upath)}: ${String(err)}`);
      },
    );
  }

  private async serve(id: number, upath: string): Promise<void> {
    let fd: number;
    let size: number;
    try {
      fd = openBeneath(this.s.root, upath);
    } catch (err) {
      const { status, detail } = statusOf(err);
      return this.reply(encodeError(id, status, detail));
    }
    try {
      const st = fstatSync(fd);
      if (!st.isFile()) return this.reply(encodeError(id, RemoteStatus.notRegular, 'not a regular file'));
      size = st.size;
      if (size <= SMALL_FILE_BYTES) {
        const out = Buffer.allocUnsafe(DATA_HEADER_BYTES + size);
        let n = 0;
        while (n < size) {
          const r = readSync(fd, out, DATA_HEADER_BYTES + n, size - n, n);
          if (r === 0) break;
          n += r;
        }
        // Nothing sent yet, so a file that shrank under us can still get a clean error.
        if (n < size) return this.reply(encodeError(id, RemoteStatus.io, 'file shrank while being read'));
        writeDataHeader(out, id, size);
        return this.reply(out);
      }
      await this.streamBody(fd, id, size);
    } catch (err) {
      if (err instanceof ConnectionGone) throw err;
      const { status, detail } = statusOf(err);
      return this.reply(encodeError(id, status, detail));
    } finally {
      closeSync(fd);
    }
  }

  private async reply(buf: Buffer): Promise<void> {
    if (this.dead) throw new ConnectionGone();
    if (!this.sock.write(buf)) await this.waitDrain();
  }

  private waitDrain(): Promise<void> {
    return new Promise((resolve, reject) => {
      if (this.dead) return reject(new ConnectionGone());
      const done = (): void => {
        this.sock.off('drain', done);
        this.wake = null;
        if (this.dead) reject(new ConnectionGone());
        else resolve();
      };
      this.wake = done;
      this.sock.on('drain', done);
    });
  }

  private async streamBody(fd: number, id: number, size: number): Promise<void> {
    const head = Buffer.allocUnsafe(DATA_HEADER_BYTES);
    writeDataHeader(head, id, size);
    let pos = 0;
    if (sendfileAvailable()) {
      // The socket must be idle before sendfile writes to it behind Node's back.
      await new Promise<void>((resolve) => this.sock.write(head, () => resolve()));
      if (this.dead) throw new ConnectionGone();
      pos = await this.sendfileBody(fd, size);
    } else {
      this.sock.write(head);
    }
    if (pos < size) await this.readBody(fd, pos, size);
  }

  /**
   * Sends the body with sendfile(2); returns how far it got when sendfile
   * does not work on this file (the rest is streamed through buffers).
   */
  private async sendfileBody(fd: number, size: number): Promise<number> {
    const send = sendRange(this.sock, fd, 0, size, this.s.idleTimeoutMs);
    if (!send) return 0;
    this.sending = send;
    // Node sees no traffic while the addon sends; the stall timer there replaces the idle timeout.
    this.sock.setTimeout(0);
    const { errno, sent } = await send.done;
    this.sending = null;
    if (this.dead) throw new ConnectionGone();
    this.sock.setTimeout(this.s.idleTimeoutMs);
    if (errno === 0 && sent === size) return size;
    if (errno === errnos.EINVAL || errno === errnos.ENOSYS || errno === errnos.EOPNOTSUPP) return sent;
    this.drop(errno === 0 ? `file shrank while sending (${sent} of ${size} bytes)` : `sendfile failed after ${sent} of ${size} bytes: ${errnoName(errno)}`);
    throw new ConnectionGone();
  }

  /** Streams file[pos, size) through pooled buffers, reading ahead of the socket. */
  private async readBody(fd: number, start: number, size: number): Promise<void> {
    const { pool, chunkBytes, chunksInFlight } = this.s;
    let pos = start;
    let outstanding = 0;
    const released = (): void => {
      outstanding--;
      this.wakeUp();
    };
    const waitRelease = (): Promise<void> =>
      new Promise((resolve, reject) => {
        if (this.dead) return reject(new ConnectionGone());
        this.wake = () => (this.dead ? reject(new ConnectionGone()) : resolve());
      });
    while (pos < size) {
      while (outstanding >= chunksInFlight) await waitRelease();
      if (this.dead) throw new ConnectionGone();
      const buf = pool.take();
      const len = Math.min(chunkBytes, size - pos);
      let n: number;
      try {
        const t0 = inlineReads.begin(this.s.readMode);
        if (t0 >= 0) {
          n = readSync(fd, buf, 0, len, pos);
          inlineReads.done(t0, n);
        } else {
          n = await readAt(fd, buf, len, pos);
        }
      } catch (err) {
        // The header is out: an ERROR frame now would be read as body bytes.
        pool.give(buf);
        this.drop(`read error after ${pos} of ${size} bytes: ${String(err)}`);
        throw new ConnectionGone();
      }
      if (this.dead) throw new ConnectionGone();
      if (n === 0) {
        // The header promised `size` bytes; the only honest way out is to
        // cut the connection so the client sees a short body.
        pool.give(buf);
        this.drop(`file shrank while sending (${pos} of ${size} bytes)`);
        throw new ConnectionGone();
      }
      pos += n;
      outstanding++;
      this.sock.write(buf.subarray(0, n), (err) => {
        if (!err) pool.give(buf);
        released();
      });
    }
    while (outstanding > 0) await waitRelease();
  }
}

export class TcpTransferServer implements TransferServer {
  private readonly conns = new Set<ServerConnection>();
  private closing: Promise<void> | null = null;

  private constructor(
    private readonly server: net.Server,
    readonly address: string,
  ) {}

  static async listen(opts: TcpServeOptions): Promise<TcpTransferServer> {
    if (!opts.secret) throw new ConfigError('transfer server: an empty shared secret is not allowed');
    const chunkBytes = opts.chunkBytes ?? 1 << 20;
    const chunksInFlight = opts.chunksInFlight ?? 4;
    const s: Settings = {
      root: opts.root,
      secret: Buffer.from(opts.secret, 'utf8'),
      chunkBytes,
      chunksInFlight,
      readMode: opts.readMode ?? 'adaptive',
      authTimeoutMs: opts.authTimeoutMs ?? 10_000,
      idleTimeoutMs: opts.idleTimeoutMs ?? 300_000,
      maxQueued: opts.maxQueuedRequests ?? 64,
      pool: new BufferPool(chunkBytes, 64),
      log: opts.log ?? (() => {}),
    };
    const server = net.createServer({ noDelay: true });
    server.maxConnections = opts.maxConnections ?? 1024;
    await new Promise<void>((resolve, reject) => {
      const onError = (err: Error): void => {
        const errno = errnoOf(err);
        reject(new DyadError('DYAD_ELISTEN', errno, `transfer server: cannot listen on ${formatAddress(opts.host, opts.port)}: ${err.message}`, { cause: err }));
      };
      server.once('error', onError);
      server.listen({ host: opts.host, port: opts.port }, () => {
        server.off('error', onError);
        resolve();
      });
    });
    const a = server.address() as net.AddressInfo;
    const self = new TcpTransferServer(server, formatAddress(a.address, a.port));
    server.on('connection', (sock) => {
      const c = new ServerConnection(sock, s);
      self.conns.add(c);
      sock.once('close', () => self.conns.delete(c));
    });
    server.on('error', (err) => s.log(`transfer server ${self.address}: ${err.message}`));
    return self;
  }

  close(): Promise<void> {
    this.closing ??= new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      for (const c of this.conns) c.drop();
    });
    return this.closing;
  }
}

export function serveTcp(opts: TcpServeOptions): Promise<TransferServer> {
  return TcpTransferServer.listen(opts);
}
