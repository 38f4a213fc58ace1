/**
 * The owner side of the UCX transfer: an authenticated TCP control
 * connection per consumer (protocol.ts), bulk data over UCX.
 *
 * Per request: files up to INLINE_MAX go back in the DATA reply, as with
 * the TCP backend (one round trip, no UCX work). Larger files:
 *  - mode am (the default): START, then the file is read in `chunkBytes`
 *    pieces into registered staging buffers and each piece is sent as a
 *    rendezvous active message to the consumer's worker, at most `window`
 *    in flight. Rendezvous means the consumer's UCX fetches the bytes into
 *    its own buffer (RDMA read on InfiniBand/RoCE, put/AM fragments over
 *    TCP), so a send completes only once the consumer has them: the window
 *    is the flow control, and memory per transfer is window x chunkBytes
 *    whatever the file size. At most `maxActive` such transfers run at once
 *    (others wait, and say so with WAIT frames), which bounds the daemon's
 *    staging memory: 16 x 8 x 512 KiB = 64 MiB with the defaults.
 *    Reading into staging buffers rather than sending from an mmap of the
 *    file costs a copy, but a file truncated mid-send then yields a clean
 *    ERROR instead of SIGBUS in the daemon.
 *  - mode get: the file is mmap'd read-only, registered, and START carries
 *    its address and packed rkey; the consumer reads it with ucp_get until
 *    it sends END. Over TCP the reads are served by this worker's progress
 *    (event-driven). Kept for measurement and for fabrics where one-sided
 *    reads win; see index.ts for why it is not the default.
 *
 * A consumer that ends a request (END), closes the connection, or stops
 * completing sends for `peerTimeoutMs` stops the transfer; in the last case
 * its endpoint is force-closed, which cancels the sends still pending.
 */
import { closeSync, fstatSync, readSync } from 'node:fs';
import { readAt } from '../io.js';
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { ConfigError, DyadError, errnoName, errnoOf, errnos } from '../../errors.js';
import { openBeneath } from '../confine.js';
import { RemoteStatus } from '../errors.js';
import { inlineReads, type IoMode } from '../inline.js';
import { Slots } from '../slots.js';
import type { ServeOptions, TransferServer } from '../types.js';
import type { UcxRegion } from './native.js';
import {
  AM_CHUNK,
  DEFAULT_CHUNK_BYTES,
  DEFAULT_WINDOW,
  FrameReader,
  FrameType,
  INLINE_MAX,
  Mode,
  NONCE_BYTES,
  PROTOCOL_VERSION,
  authMac,
  decodeAuth,
  decodeEnd,
  decodeGet,
  encodeChunkHeader,
  encodeData,
  encodeError,
  encodeFrame,
  encodeHello,
  encodeStart,
  encodeWait,
  encodeWelcome,
  formatAddress,
  WAIT_INTERVAL_MS,
  macEqual,
  type Frame,
} from './protocol.js';
import type { EpEntry, RegisteredPool, UcxRuntime } from './runtime.js';

export interface UcxServeOptions extends ServeOptions {
  /** Bytes per chunk message (mode am) and the consumer's get size hint. */
  chunkBytes?: number;
  /** Chunks of one transfer in flight. */
  window?: number;
  /** Large (chunked) transfers served at once; the rest wait. Bounds staging memory. */
  maxActive?: number;
  /** Where chunks are read; see inline.ts. Default 'adaptive'. */
  readMode?: IoMode;
  /**
   * Read and send chunks on the native chunk mover's thread and worker
   * (native/ucx/mover.h) instead of the event loop. Default: on where the
   * addon has it.
   */
  sendThread?: boolean;
  maxConnections?: number;
  authTimeoutMs?: number;
  /** An authenticated connection with nothing in progress is dropped after this long. */
  idleTimeoutMs?: number;
  /** A consumer completing no chunk for this long is given up on. */
  peerTimeoutMs?: number;
  /** Requests one connection may have outstanding before it is dropped. */
  maxQueuedRequests?: number;
  log?: (msg: string) => void;
}

interface Settings {
  root: string;
  secret: Buffer;
  chunkBytes: number;
  window: number;
  readMode: IoMode;
  sendThread: boolean;
  authTimeoutMs: number;
  idleTimeoutMs: number;
  peerTimeoutMs: number;
  maxQueued: number;
  log: (msg: string) => void;
}

function statusOf(err: unknown): { status: number; detail: string } {
  if (err instanceof DyadError && err.code === 'DYAD_EFORBIDDEN') return { status: RemoteStatus.forbidden, detail: err.message };
  const errno = errnoOf(err);
  if (errno === errnos.ENOENT || errno === errnos.ENOTDIR) return { status: RemoteStatus.notFound, detail: 'no such file' };
  return { status: RemoteStatus.io, detail: `${errnoName(errno)}: ${err instanceof Error ? err.message : String(err)}` };
}

interface Request {
  id: number;
  ended: boolean;
  /** Wakes the sending loop (a send completed, END arrived, connection died). */
  wake: (() => void) | null;
  mapping: UcxRegion | null;
  fd: number;
  endedByPeer: boolean;
}

const MAPPING_GRACE_MS = 10_000;

class ServerConnection {
  private readonly reader = new FrameReader();
  private readonly nonce = randomBytes(NONCE_BYTES);
  private authed = false;
  dead = false;
  private clientWorker: Buffer | null = null;
  private readonly requests = new Map<number, Request>();

  constructor(
    private readonly sock: net.Socket,
    private readonly s: Settings,
    private readonly rt: UcxRuntime,
    private readonly slots: Slots,
  ) {
    sock.setNoDelay(true);
    sock.setTimeout(s.authTimeoutMs);
    sock.on('timeout', () => {
      if (!this.authed) return this.drop('no AUTH in time');
      if (this.requests.size === 0) this.drop('idle timeout');
      // A fired socket timer only re-arms on traffic; transfers in progress are not idleness.
      else this.sock.setTimeout(this.s.idleTimeoutMs);
    });
    sock.on('error', () => this.drop());
    sock.on('close', () => this.drop());
    sock.on('data', (chunk: Buffer) => this.onData(chunk));
    sock.write(encodeHello(this.nonce));
  }

  private get peer(): string {
    return `${this.sock.remoteAddress}:${this.sock.remotePort}`;
  }

  drop(why?: string): void {
    if (why && !this.dead) this.s.log(`ucx transfer server: dropping ${this.peer}: ${why}`);
    this.dead = true;
    this.sock.destroy();
    for (const r of this.requests.values()) this.endRequest(r);
  }

  private onData(chunk: Buffer): void {
    if (this.dead) return;
    let frames: Frame[];
    try {
      frames = this.reader.push(chunk);
    } catch (err) {
      return this.drop(err instanceof Error ? err.message : String(err));
    }
    for (const f of frames) {
      if (this.dead) return;
      try {
        this.onFrame(f);
      } catch (err) {
        return this.drop(err instanceof Error ? err.message : String(err));
      }
    }
  }

  private onFrame(f: Frame): void {
    if (!this.authed) {
      if (f.type !== FrameType.auth) return this.drop('request before AUTH');
      let ok = false;
      try {
        const a = decodeAuth(f.payload);
        ok = a.version === PROTOCOL_VERSION && macEqual(a.mac, authMac(this.s.secret, 'client', this.nonce, a.nonce, a.workerAddress));
        if (ok) {
          this.authed = true;
          this.clientWorker = Buffer.from(a.workerAddress);
          this.sock.setTimeout(this.s.idleTimeoutMs);
          this.sock.write(encodeWelcome(authMac(this.s.secret, 'server', this.nonce, a.nonce, this.rt.address), this.rt.address));
        }
      } catch {
        ok = false;
      }
      if (!ok) {
        this.s.log(`ucx transfer server: authentication failed from ${this.sock.remoteAddress}`);
        this.dead = true;
        this.sock.end(encodeFrame(FrameType.denied, Buffer.from('authentication failed')));
        setTimeout(() => this.sock.destroy(), 1000).unref();
      }
      return;
    }
    if (f.type === FrameType.end) {
      const r = this.requests.get(decodeEnd(f.payload));
      if (r) {
        r.endedByPeer = true;
        this.endRequest(r);
      }
      return;
    }
    if (f.type !== FrameType.get) return this.drop(`unexpected frame type ${f.type}`);
    const g = decodeGet(f.payload);
    if (this.requests.has(g.id)) return this.drop(`request id ${g.id} reused while in progress`);
    if (this.requests.size >= this.s.maxQueued) return this.drop('too many outstanding requests');
    if (g.mode !== Mode.am && g.mode !== Mode.get) return this.drop(`unknown transfer mode ${g.mode}`);
    const req: Request = { id: g.id, ended: false, wake: null, mapping: null, fd: -1, endedByPeer: false };
    // Small files, refusals and errors are answered synchronously: no
    // promise, no bookkeeping, one write (small-file latency).
    const size = this.open(req, g.upath);
    if (size < 0) return;
    this.requests.set(g.id, req);
    const big = g.mode === Mode.get ? this.serveMapped(req, size) : this.serveQueued(req, Buffer.from(g.token), size);
    big.then(
      () => this.finishRequest(req),
      (err: unknown) => {
        this.finishRequest(req);
        this.drop(`serving ${JSON.stringify(g.upath)}: ${String(err)}`);
      },
    );
  }

  /** The consumer needs nothing more: stop sending, free the mapping. */
  private endRequest(r: Request): void {
    if (r.ended) return;
    r.ended = true;
    const w = r.wake;
    r.wake = null;
    w?.();
  }

  private finishRequest(r: Request): void {
    r.ended = true;
    const m = r.mapping;
    r.mapping = null;
    if (m) {
      // Over TCP the consumer's gets are answered by our progress, reading
      // the mapping: it must outlive any get still in flight. END promises
      // there is none; a vanished connection does not, so wait a while.
      if (r.endedByPeer) m.release();
      else setTimeout(() => m.release(), MAPPING_GRACE_MS).unref();
    }
    if (r.fd >= 0) {
      closeSync(r.fd);
      r.fd = -1;
    }
    this.requests.delete(r.id);
  }

  private send(buf: Buffer): void {
    if (!this.dead) this.sock.write(buf);
  }

  /**
   * Opens the file and answers at once when it can (refusal, error, inline
   * DATA), returning -1; otherwise returns the size, `req.fd` open.
   */
  private open(req: Request, upath: string): number {
    let size: number;
    try {
      req.fd = openBeneath(this.s.root, upath);
      const st = fstatSync(req.fd);
      if (!st.isFile()) {
        this.send(encodeError(req.id, RemoteStatus.notRegular, 'not a regular file'));
        return this.close(req);
      }
      size = st.size;
    } catch (err) {
      const { status, detail } = statusOf(err);
      this.send(encodeError(req.id, status, detail));
      return this.close(req);
    }
    if (size > INLINE_MAX) return size;
    const body = Buffer.allocUnsafe(size);
    try {
      let n = 0;
      while (n < size) {
        const r = readSync(req.fd, body, n, size - n, n);
        if (r === 0) break;
        n += r;
      }
      this.send(n < size ? encodeError(req.id, RemoteStatus.io, 'file shrank while being read') : encodeData(req.id, body));
    } catch (err) {
      const { status, detail } = statusOf(err);
      this.send(encodeError(req.id, status, detail));
    }
    return this.close(req);
  }

  private close(req: Request): -1 {
    if (req.fd >= 0) closeSync(req.fd);
    req.fd = -1;
    return -1;
  }

  private async serveQueued(req: Request, token: Buffer, size: number): Promise<void> {
    const waiting = setInterval(() => this.send(encodeWait(req.id)), WAIT_INTERVAL_MS);
    try {
      await this.slots.acquire();
    } finally {
      clearInterval(waiting);
    }
    try {
      await this.serveChunks(req, token, size);
    } finally {
      this.slots.release();
    }
  }

  private async serveMapped(req: Request, size: number): Promise<void> {
    try {
      req.mapping = this.rt.worker.mapFile(req.fd, size);
      const rkey = req.mapping.rkey();
      this.send(encodeStart({ id: req.id, size, chunkBytes: this.s.chunkBytes, window: this.s.window, remote: { address: req.mapping.address(), rkey } }));
    } catch (err) {
      if (req.mapping) req.mapping.release();
      req.mapping = null;
      this.send(encodeError(req.id, RemoteStatus.io, `cannot map the file for UCX: ${err instanceof Error ? err.message : String(err)}`));
      return;
    }
    // The mapping holds the file; it lives until END or the connection goes.
    closeSync(req.fd);
    req.fd = -1;
    while (!req.ended && !this.dead) await new Promise<void>((resolve) => (req.wake = resolve));
  }

  /**
   * The chunk mover's thread reads and sends (native/ucx/mover.h); this
   * only waits for the end: all sent, END from the consumer, the
   * connection gone, a failure, or no chunk taken for peerTimeoutMs (then
   * the consumer's endpoint is closed, which ends the sends it holds).
   */
  private async serveOnThread(req: Request, token: Buffer, size: number): Promise<void> {
    const { chunkBytes, window, peerTimeoutMs } = this.s;
    const wake = (): void => {
      const w = req.wake;
      req.wake = null;
      w?.();
    };
    let outcome: { errno: number; detail: string } | null = null;
    this.send(encodeStart({ id: req.id, size, chunkBytes, window }));
    try {
      this.rt.startSend(token, this.clientWorker!, req.fd, size, chunkBytes, window, (_t, errno, _crc, _bytes, detail) => {
        outcome = { errno, detail };
        wake();
      });
    } catch (err) {
      this.send(encodeError(req.id, RemoteStatus.io, `cannot send over UCX: ${err instanceof Error ? err.message : String(err)}`));
      return;
    }
    let stalled = false;
    let lastSent = 0;
    let lastProgress = Date.now();
    const watchdog = setInterval(() => {
      const n = this.rt.mover('tx')?.sent(token) ?? -1;
      if (n > lastSent) {
        lastSent = n;
        lastProgress = Date.now();
      } else if (Date.now() - lastProgress > peerTimeoutMs) {
        stalled = true;
        wake();
      }
    }, Math.min(1000, peerTimeoutMs)).unref();
    try {
      while (outcome === null && !req.ended && !this.dead && !stalled) await new Promise<void>((resolve) => (req.wake = resolve));
    } finally {
      clearInterval(watchdog);
      this.rt.forgetSend(token, stalled);
    }
    const o = outcome as { errno: number; detail: string } | null;
    const failure = stalled ? `consumer took no chunk for ${peerTimeoutMs} ms` : o && o.errno !== 0 ? o.detail : null;
    if (failure !== null && !req.ended) {
      this.s.log(`ucx transfer server: ${this.peer}: ${failure}`);
      this.send(encodeError(req.id, RemoteStatus.io, failure));
    }
  }

  private async serveChunks(req: Request, token: Buffer, size: number): Promise<void> {
    if (req.ended || this.dead) return;
    if (this.s.sendThread && this.rt.mover('tx')) return this.serveOnThread(req, token, size);
    let ep: EpEntry;
    try {
      ep = this.rt.endpoint(this.clientWorker!);
    } catch (err) {
      return this.send(encodeError(req.id, RemoteStatus.io, `cannot reach the consumer over UCX: ${err instanceof Error ? err.message : String(err)}`));
    }
    const { chunkBytes, window } = this.s;
    this.send(encodeStart({ id: req.id, size, chunkBytes, window }));
    const pool: RegisteredPool = this.rt.pool(chunkBytes);
    const flags = this.rt.addon.amFlags.rndv;
    let pos = 0;
    let outstanding = 0;
    let failure: string | null = null;
    let lastProgress = Date.now();
    const wait = (): Promise<void> =>
      new Promise((resolve) => {
        req.wake = resolve;
      });
    // Gives up on a consumer that stops taking chunks: forcing its endpoint
    // closed cancels the sends still pending, which then end this loop.
    const watchdog = setInterval(() => {
      if (outstanding > 0 && Date.now() - lastProgress > this.s.peerTimeoutMs) {
        failure ??= `consumer took no chunk for ${this.s.peerTimeoutMs} ms`;
        this.rt.drop(ep, true);
      }
    }, Math.min(1000, this.s.peerTimeoutMs)).unref();
    try {
      while (pos < size && !req.ended && !this.dead && failure === null) {
        if (outstanding >= window) {
          await wait();
          continue;
        }
        const b = pool.take();
        const len = Math.min(chunkBytes, size - pos);
        let n: number;
        try {
          const t0 = inlineReads.begin(this.s.readMode);
          if (t0 >= 0) {
            n = readSync(req.fd, b.buf, 0, len, pos);
            inlineReads.done(t0, n);
          } else {
            n = await readAt(req.fd, b.buf, len, pos);
          }
        } catch (err) {
          pool.give(b);
          failure = `read error at byte ${pos} of ${size}: ${String(err)}`;
          break;
        }
        if (n < len) {
          pool.give(b);
          failure = `file shrank while sending (${pos + n} of ${size} bytes)`;
          break;
        }
        if (req.ended || this.dead) {
          pool.give(b);
          break;
        }
        const offset = pos;
        pos += n;
        outstanding++;
        ep.run((e) => e.amSend(AM_CHUNK, encodeChunkHeader(token, offset), b.buf.subarray(0, n), flags, b.region)).then(
          () => {
            pool.give(b);
            outstanding--;
            lastProgress = Date.now();
            const w = req.wake;
            req.wake = null;
            w?.();
          },
          (err: unknown) => {
            // The buffer may still be referenced by a cancelled request: let the GC have it.
            b.region.release();
            outstanding--;
            failure ??= `UCX send failed: ${err instanceof Error ? err.message : String(err)}`;
            const w = req.wake;
            req.wake = null;
            w?.();
          },
        );
      }
      while (outstanding > 0) await wait();
    } finally {
      clearInterval(watchdog);
    }
    if (failure !== null && !req.ended) {
      this.s.log(`ucx transfer server: ${this.peer}: ${failure}`);
      this.send(encodeError(req.id, RemoteStatus.io, failure));
    }
  }
}

export class UcxTransferServer implements TransferServer {
  private readonly conns = new Set<ServerConnection>();
  private closing: Promise<void> | null = null;

  private constructor(
    private readonly server: net.Server,
    private readonly rt: UcxRuntime,
    readonly address: string,
  ) {}

  static async listen(opts: UcxServeOptions, rt: UcxRuntime): Promise<UcxTransferServer> {
    if (!opts.secret) throw new ConfigError('transfer server: an empty shared secret is not allowed');
    const chunkBytes = opts.chunkBytes ?? DEFAULT_CHUNK_BYTES;
    if (chunkBytes <= 0 || chunkBytes > 1 << 30) throw new ConfigError(`UCX chunk size ${chunkBytes} out of range`);
    const s: Settings = {
      root: opts.root,
      secret: Buffer.from(opts.secret, 'utf8'),
      chunkBytes,
      window: Math.max(1, Math.min(opts.window ?? DEFAULT_WINDOW, 64)),
      readMode: opts.readMode ?? 'adaptive',
      sendThread: opts.sendThread ?? true,
      authTimeoutMs: opts.authTimeoutMs ?? 10_000,
      idleTimeoutMs: opts.idleTimeoutMs ?? 300_000,
      peerTimeoutMs: opts.peerTimeoutMs ?? 30_000,
      maxQueued: opts.maxQueuedRequests ?? 256,
      log: opts.log ?? (() => {}),
    };
    // The send thread and its first transfer's buffers are made now, not in the first pull's path.
    if (s.sendThread) rt.prepareMover('tx', chunkBytes, s.window);
    const slots = new Slots(opts.maxActive ?? 16);
    const server = net.createServer({ noDelay: true });
    server.maxConnections = opts.maxConnections ?? 1024;
    await new Promise<void>((resolve, reject) => {
      const onError = (err: Error): void => {
        reject(new DyadError('DYAD_ELISTEN', errnoOf(err), `ucx transfer server: cannot listen on ${opts.host}:${opts.port}: ${err.message}`, { cause: err }));
      };
      server.once('error', onError);
      server.listen({ host: opts.host, port: opts.port }, () => {
        server.off('error', onError);
        resolve();
      });
    });
    const a = server.address() as net.AddressInfo;
    const self = new UcxTransferServer(server, rt, formatAddress(a.address, a.port, rt.address));
    server.on('connection', (sock) => {
      const c = new ServerConnection(sock, s, rt, slots);
      self.conns.add(c);
      sock.once('close', () => self.conns.delete(c));
    });
    server.on('error', (err) => s.log(`ucx transfer server ${self.address}: ${err.message}`));
    return self;
  }

  close(): Promise<void> {
    this.closing ??= new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      for (const c of this.conns) c.drop();
    }).then(() => this.rt.release());
    return this.closing;
  }
}
