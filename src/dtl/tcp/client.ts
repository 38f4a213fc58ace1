/**
 * The consumer side of the TCP transfer: pulls files from owners' transfer
 * servers into atomic temp files (src/dtl/sink.ts).
 *
 * Connections: a small pool per peer (default 4), each carrying one request
 * at a time and kept alive for reuse. A pool rather than multiplexing on one
 * connection because the reply body then needs no chunk framing: the socket
 * reads straight into the sink's write buffers (Node's `onread` user-buffer
 * mode, zero-copy from the kernel to the buffer handed to write(2)), and the
 * kernel's per-connection flow control is the backpressure. A stalled pull
 * (slow disk) therefore never holds up another one, and an aborted pull just
 * drops its connection. Measured on the project VM, `onread` reads are
 * ~1.5x faster than the default 64 KiB 'data' chunks.
 *
 * Small replies (header + <= 64 KiB) arrive in one read into the
 * connection's scratch buffer and are written with a single write(2).
 * Large bodies are handed, after the first read, to the receive thread
 * (receive.ts): the socket is paused, the thread reads exactly the rest of
 * the body into the file, and the socket resumes for the next reply. That
 * doubled a pull's throughput on the project VM (bench/transfer-raw.ts) and
 * keeps the loop free for FUSE meanwhile; the onread path above remains
 * for CRC-32 digests and where the addon is missing.
 *
 * Every wait on the peer is bounded: connect and handshake, silence while a
 * reply is due or a body is streaming (not while we are the slow side,
 * waiting on our own disk). A pooled connection found dead before any reply
 * byte arrived is retried once on a fresh connection.
 */
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { ConfigError, DyadError, errnoName, errnos } from '../../errors.js';
import { BufferPool } from '../buffers.js';
import { MAX_UPATH_BYTES, refused } from '../confine.js';
import { assertDigest } from '../digest.js';
import { abortError, authError, digestError, peerError, remoteError } from '../errors.js';
import { prepareReceiveBuffers, receiveChannel, receiveRange, type RangeReceive, type ReceiveOutcome } from '../receive.js';
import { FileSink, type WriteMode } from '../sink.js';
import type { PullOptions, PullRequest, PullResult, TransferClient } from '../types.js';
import {
  DATA_HEADER_BYTES,
  FrameType,
  MAC_BYTES,
  NONCE_BYTES,
  PROTOCOL_VERSION,
  ProtocolError,
  authMac,
  decodeData,
  decodeError,
  decodeHello,
  encodeAuth,
  encodeGet,
  macEqual,
  parseAddress,
  parseFrame,
  type Frame,
} from './protocol.js';

export interface TcpClientOptions {
  secret: string;
  /** Connections kept per peer; pulls beyond that queue for one. */
  maxConnectionsPerPeer?: number;
  /** An unused pooled connection is closed after this long. */
  idleTimeoutMs?: number;
  /** Default for PullOptions.peerTimeoutMs. */
  peerTimeoutMs?: number;
  /** Size of each receive/write buffer. */
  bufferBytes?: number;
  /** Buffers one pull may hold (filling + being written) before it stops reading. */
  buffersPerPull?: number;
  /** Where received buffers are written; see sink.ts. Default 'adaptive'. */
  writeMode?: WriteMode;
}

interface Settings {
  secret: Buffer;
  maxConns: number;
  idleTimeoutMs: number;
  peerTimeoutMs: number;
  buffersPerPull: number;
  writeMode: WriteMode;
  pool: BufferPool;
}

/** Header + the largest "small" body, so a small reply lands in one read. */
const SCRATCH_BYTES = DATA_HEADER_BYTES + (64 << 10) + 64;

/** Bodies with at least this much left after the first read go to the receive thread (receive.ts). */
const THREAD_MIN_BYTES = 1 << 20;

/** Internal: the pull failed on a reused connection before any reply byte. */
class StaleConnection {
  constructor(readonly err: DyadError) {}
}

/** Why a connection never became ready; turned into an error naming the pull. */
interface ConnectFailure {
  detail: string;
  cause?: unknown;
  err?: DyadError;
}

interface Job {
  req: PullRequest;
  dest: string;
  opts: PullOptions;
  timeoutMs: number;
  id: number;
  reused: boolean;
  gotResponse: boolean;
  sink: FileSink | null;
  settle: (err: DyadError | StaleConnection | null, result?: PullResult) => void;
}

class Connection {
  private readonly scratch = Buffer.allocUnsafe(SCRATCH_BYTES);
  private sStart = 0;
  private sEnd = 0;
  private lastRegion: Buffer | null = null;
  private inBody = false;
  private bodyLeft = 0;
  private job: Job | null = null;
  /** The receive thread writing the current body, if it took over. */
  private thread: RangeReceive | null = null;
  private state: 'hello' | 'welcome' | 'ready' | 'dead' = 'hello';
  private readonly nonce = randomBytes(NONCE_BYTES);
  private serverNonce: Buffer | null = null;
  private nextId = 1;
  private handshake: { resolve: () => void; reject: (f: ConnectFailure) => void } | null = null;
  readonly ready: Promise<void>;
  readonly sock: net.Socket;
  uses = 0;

  constructor(
    private readonly pool: PeerPool,
    private readonly s: Settings,
    connectTimeoutMs: number,
  ) {
    this.ready = new Promise<void>((resolve, reject) => (this.handshake = { resolve, reject }));
    // A handshake nobody waits for any more (pull aborted) must not surface as unhandled.
    this.ready.catch(() => {});
    this.sock = net.connect({
      host: pool.host,
      port: pool.port,
      noDelay: true,
      onread: { buffer: () => this.target(), callback: (n: number, buf: Uint8Array) => this.onRead(n, buf) },
    });
    this.sock.setTimeout(connectTimeoutMs);
    this.sock.on('timeout', () => this.onTimeout());
    this.sock.on('error', (err: NodeJS.ErrnoException) => {
      const what = this.state === 'hello' && this.uses === 0 && !this.serverNonce ? 'cannot connect' : 'connection error';
      this.die(`${what}: ${err.message}`, err);
    });
    this.sock.on('close', () => this.die('connection closed by peer'));
  }

  private get peer(): string {
    return this.pool.address;
  }

  // --- receiving -----------------------------------------------------------

  /**
   * Where the next socket read lands: the pull's write buffer if possible.
   * Node asks for it after every read, even one that pauses the socket, and
   * reads into it once resumed: after the receive thread has had the body,
   * that read is the next reply, so it must go to the scratch buffer.
   */
  private target(): Buffer {
    if (this.thread) {
      this.lastRegion = null;
      return this.scratch.subarray(this.sEnd);
    }
    if (this.inBody && this.job?.sink) {
      const r = this.job.sink.region(this.bodyLeft);
      if (r) {
        this.lastRegion = r;
        return r;
      }
    }
    this.lastRegion = null;
    const room = this.scratch.subarray(this.sEnd);
    return this.inBody ? room.subarray(0, Math.min(room.length, this.bodyLeft)) : room;
  }

  private onRead(n: number, buf: Uint8Array): boolean {
    try {
      if (this.state === 'dead') return false;
      if (this.lastRegion !== null && buf === this.lastRegion) {
        this.lastRegion = null;
        this.job!.sink!.commit(n);
        this.bodyLeft -= n;
        if (this.bodyLeft === 0) this.bodyDone();
      } else {
        this.sEnd += n;
        this.process();
      }
      return this.keepReading();
    } catch (err) {
      // Throwing out of an onread callback would crash the process.
      this.die(err instanceof ProtocolError ? `protocol error: ${err.message}` : `internal error: ${String(err)}`, err);
      return false;
    }
  }

  /** False pauses the socket: until the sink has a buffer free again, or the receive thread is done. */
  private keepReading(): boolean {
    const sink = this.job?.sink;
    if (this.thread) return false;
    if (!this.inBody || !sink || this.state === 'dead') return true;
    if (this.bodyLeft >= THREAD_MIN_BYTES && this.startThread(this.job!, sink)) return false;
    if (sink.region(0) !== null) return true;
    const job = this.job;
    sink.onResume = () => {
      if (this.job === job && this.state !== 'dead') this.sock.resume();
    };
    return false;
  }

  private process(): void {
    while (this.sStart < this.sEnd && this.state !== 'dead') {
      if (this.inBody) {
        const k = Math.min(this.bodyLeft, this.sEnd - this.sStart);
        this.job!.sink!.write(this.scratch.subarray(this.sStart, this.sStart + k));
        this.sStart += k;
        this.bodyLeft -= k;
        if (this.bodyLeft === 0) this.bodyDone();
        continue;
      }
      const r = parseFrame(this.scratch, this.sStart, this.sEnd);
      if (!r) break;
      this.sStart = r.next;
      this.onFrame(r.frame);
    }
    if (this.sStart === this.sEnd) {
      this.sStart = this.sEnd = 0;
    } else if (this.sStart > 0) {
      this.scratch.copyWithin(0, this.sStart, this.sEnd);
      this.sEnd -= this.sStart;
      this.sStart = 0;
    }
  }

  private onFrame(f: Frame): void {
    switch (this.state) {
      case 'hello': {
        if (f.type !== FrameType.hello) throw new ProtocolError(`expected HELLO, got frame type ${f.type}`);
        const h = decodeHello(f.payload);
        if (h.version !== PROTOCOL_VERSION) throw new ProtocolError(`peer speaks protocol ${h.version}, we speak ${PROTOCOL_VERSION}`);
        this.serverNonce = Buffer.from(h.nonce);
        this.sock.write(encodeAuth(this.nonce, authMac(this.s.secret, 'client', this.serverNonce, this.nonce)));
        this.state = 'welcome';
        return;
      }
      case 'welcome': {
        if (f.type === FrameType.denied) {
          return this.die('', undefined, authError(this.peer, `rejected our credentials (${f.payload.toString('utf8')})`));
        }
        if (f.type !== FrameType.welcome || f.payload.length !== MAC_BYTES) throw new ProtocolError('expected WELCOME');
        if (!macEqual(f.payload, authMac(this.s.secret, 'server', this.serverNonce!, this.nonce))) {
          return this.die('', undefined, authError(this.peer, 'could not prove it holds the shared secret'));
        }
        this.state = 'ready';
        this.handshake?.resolve();
        this.handshake = null;
        return;
      }
      case 'ready':
        break;
      default:
        return;
    }
    const job = this.job;
    if (!job) throw new ProtocolError(`unsolicited frame type ${f.type}`);
    if (f.type === FrameType.data) {
      const d = decodeData(f.payload);
      if (d.id !== job.id) throw new ProtocolError(`reply for request ${d.id}, expected ${job.id}`);
      job.gotResponse = true;
      this.onHeader(job, d.size);
    } else if (f.type === FrameType.error) {
      const e = decodeError(f.payload);
      if (e.id !== job.id) throw new ProtocolError(`error for request ${e.id}, expected ${job.id}`);
      job.gotResponse = true;
      this.finishJob(remoteError(this.peer, job.req.upath, e.status, e.detail), false);
    } else {
      throw new ProtocolError(`unexpected frame type ${f.type}`);
    }
  }

  private onHeader(job: Job, size: number): void {
    if (size !== job.req.size) {
      // The body is already on its way; dropping the connection is cheaper than draining it.
      return this.finishJob(digestError(this.peer, job.req.upath, `size mismatch: expected ${job.req.size} bytes, peer has ${size}`), true);
    }
    const sink = new FileSink(
      job.dest,
      { size, digest: job.req.digest },
      { pool: this.s.pool, buffersPerSink: this.s.buffersPerPull, writeMode: this.s.writeMode, mode: job.opts.mode, fsync: job.opts.fsync },
      this.peer,
      job.req.upath,
    );
    try {
      sink.open();
    } catch (err) {
      return this.finishJob(err as DyadError, size > 0);
    }
    job.sink = sink;
    // After bodyDone the sink belongs to finish(), and this connection may serve another pull.
    sink.onError = (err) => {
      if (this.job === job) this.finishJob(err, true);
    };
    if (size === 0) return this.bodyDone();
    this.inBody = true;
    this.bodyLeft = size;
  }

  /**
   * Hands the rest of the body to the receive thread; false if it cannot
   * take it (no addon, a CRC-32 digest), and this thread reads on.
   */
  private startThread(job: Job, sink: FileSink): boolean {
    const at = sink.handOff();
    if (!at) return false;
    const length = this.bodyLeft;
    const r = receiveRange(this.sock, at.fd, at.offset, length, job.timeoutMs, at.crc);
    if (!r) return false;
    this.thread = r;
    if (receiveChannel.hasSubscribers) receiveChannel.publish({ peer: this.peer, upath: job.req.upath, offset: at.offset, length });
    // The thread times a silent peer itself; the socket sees no traffic meanwhile.
    this.sock.setTimeout(0);
    void r.done.then((o) => this.threadDone(job, sink, r, length, o));
    return true;
  }

  private threadDone(job: Job, sink: FileSink, r: RangeReceive, length: number, o: ReceiveOutcome): void {
    if (this.thread !== r) return; // cancelled: finishJob has dealt with the pull
    this.thread = null;
    sink.absorb(o.received, o.crc);
    if (o.errno === 0 && o.received === length) {
      this.bodyLeft = 0;
      this.sock.resume();
      return this.bodyDone();
    }
    const name = errnoName(o.errno);
    if (o.fileError) return sink.failWrite(Object.assign(new Error(`${name} writing the received bytes`), { code: name }));
    this.bodyLeft -= o.received;
    if (o.errno === errnos.ETIMEDOUT) {
      return this.finishJob(peerError(this.peer, job.req.upath, `no data for ${job.timeoutMs} ms (${sink.bytes} of ${job.req.size} bytes received)`), true);
    }
    this.die(o.errno === errnos.ECONNRESET ? 'connection closed by peer' : `connection error: ${name}`);
  }

  /** The whole body arrived: the connection is free before the file is even renamed. */
  private bodyDone(): void {
    const job = this.job!;
    this.inBody = false;
    this.job = null;
    this.toPool();
    job.sink!.finish().then(
      (r) => job.settle(null, r),
      (err: unknown) => job.settle(err instanceof DyadError ? err : peerError(this.peer, job.req.upath, String(err))),
    );
  }

  /** Ends the current pull with an error; the connection survives only if its stream is in sync. */
  private finishJob(err: DyadError | StaleConnection, destroy: boolean): void {
    const job = this.job;
    if (!job) return;
    this.job = null;
    if (this.thread) {
      // cancel() shuts the socket down: the connection cannot be reused.
      this.thread.cancel();
      this.thread = null;
      destroy = true;
    }
    this.inBody = false;
    this.bodyLeft = 0;
    if (destroy) this.die('', undefined, undefined);
    else this.toPool();
    const sink = job.sink;
    if (sink) sink.abort().then(() => job.settle(err));
    else job.settle(err);
  }

  private toPool(): void {
    if (this.state === 'dead') return;
    this.sock.setTimeout(this.s.idleTimeoutMs);
    this.sock.unref();
    this.pool.release(this);
  }

  // --- requests and lifecycle -----------------------------------------------

  run(req: PullRequest, dest: string, opts: PullOptions, timeoutMs: number): Promise<PullResult> {
    return new Promise<PullResult>((resolve, reject) => {
      const signal = opts.signal;
      const onAbort = (): void => {
        if (this.job === job) this.finishJob(abortError(this.peer, req.upath, signal?.reason), true);
      };
      const job: Job = {
        req,
        dest,
        opts,
        timeoutMs,
        id: this.nextId++ >>> 0,
        reused: this.uses > 0,
        gotResponse: false,
        sink: null,
        settle: (err, result) => {
          signal?.removeEventListener('abort', onAbort);
          if (err) reject(err);
          else resolve(result!);
        },
      };
      this.uses++;
      this.job = job;
      this.sock.ref();
      this.sock.setTimeout(timeoutMs);
      signal?.addEventListener('abort', onAbort, { once: true });
      this.sock.write(encodeGet(job.id, req.upath));
    });
  }

  private onTimeout(): void {
    if (this.state === 'dead') return;
    if (this.state !== 'ready') return this.die('no handshake from peer in time');
    const job = this.job;
    if (!job) return this.die('', undefined, undefined); // idle pooled connection
    // Paused because our own disk is behind: not the peer's silence. A fired
    // socket timer only re-arms on traffic, so re-arm it by hand.
    if (this.inBody && job.sink && !this.thread && job.sink.region(0) === null) {
      this.sock.setTimeout(job.timeoutMs);
      return;
    }
    const what = this.inBody ? `no data for ${job.timeoutMs} ms (${job.sink?.bytes ?? 0} of ${job.req.size} bytes received)` : `no reply within ${job.timeoutMs} ms`;
    this.finishJob(peerError(this.peer, job.req.upath, what), true);
  }

  /**
   * The connection is unusable: fail whatever depended on it. `detail` builds
   * a DYAD_EPEER for the current pull, unless `err` is given.
   */
  die(detail: string, cause?: unknown, err?: DyadError): void {
    if (this.state === 'dead') return;
    const wasReady = this.state === 'ready';
    this.state = 'dead';
    this.sock.destroy();
    this.pool.remove(this);
    if (this.handshake) {
      this.handshake.reject(err ? { detail, err } : { detail, cause });
      this.handshake = null;
    }
    const job = this.job;
    if (!job || !wasReady) return;
    let e: DyadError | StaleConnection;
    if (err) e = err;
    else {
      const progress = this.inBody ? ` after ${job.sink?.bytes ?? 0} of ${job.req.size} bytes` : '';
      const pe = peerError(this.peer, job.req.upath, `${detail || 'connection lost'}${progress}`, cause);
      e = job.reused && !job.gotResponse ? new StaleConnection(pe) : pe;
    }
    this.finishJob(e, false);
  }
}

class PeerPool {
  readonly host: string;
  readonly port: number;
  private readonly idle: Connection[] = [];
  private readonly all = new Set<Connection>();
  private pendingConnects = 0;
  private readonly waiters: { give: (c: Connection) => void; fail: (f: ConnectFailure) => void; connectTimeoutMs: number }[] = [];

  constructor(
    readonly address: string,
    private readonly s: Settings,
  ) {
    const a = parseAddress(address);
    this.host = a.host;
    this.port = a.port;
  }

  /** A ready idle connection without a promise round trip (small-file latency). */
  takeIdle(): Connection | undefined {
    return this.idle.pop();
  }

  acquire(upath: string, signal: AbortSignal | undefined, timeoutMs: number): Promise<Connection> {
    return new Promise<Connection>((resolve, reject) => {
      const onAbort = (): void => {
        const i = this.waiters.indexOf(w);
        if (i >= 0) this.waiters.splice(i, 1);
        reject(abortError(this.address, upath, signal?.reason));
      };
      const w = {
        give: (c: Connection): void => {
          signal?.removeEventListener('abort', onAbort);
          resolve(c);
        },
        fail: (f: ConnectFailure): void => {
          signal?.removeEventListener('abort', onAbort);
          reject(f.err ?? peerError(this.address, upath, f.detail, f.cause));
        },
        connectTimeoutMs: timeoutMs,
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.waiters.push(w);
      this.grow();
    });
  }

  /** Opens connections while waiters outnumber connections on their way, within the limit. */
  private grow(): void {
    while (this.waiters.length > this.pendingConnects && this.all.size < this.s.maxConns) {
      const timeoutMs = this.waiters[this.pendingConnects]!.connectTimeoutMs;
      this.pendingConnects++;
      const c = new Connection(this, this.s, timeoutMs);
      this.all.add(c);
      c.ready.then(
        () => {
          this.pendingConnects--;
          if (this.all.has(c)) this.release(c);
          else this.grow();
        },
        (f: ConnectFailure) => {
          this.pendingConnects--;
          // Connections are interchangeable, so the failure goes to the longest waiter.
          this.waiters.shift()?.fail(f);
          this.grow();
        },
      );
    }
  }

  release(c: Connection): void {
    if (!this.all.has(c)) return;
    const w = this.waiters.shift();
    if (w) {
      c.sock.ref();
      w.give(c);
    } else {
      this.idle.push(c);
    }
  }

  remove(c: Connection): void {
    if (!this.all.delete(c)) return;
    const i = this.idle.indexOf(c);
    if (i >= 0) this.idle.splice(i, 1);
    this.grow();
  }

  /** Fails waiters, kills every connection; resolves when their sockets are closed. */
  close(): Promise<void> {
    for (const w of this.waiters.splice(0)) w.fail({ detail: 'transfer client closed' });
    const waits: Promise<void>[] = [];
    for (const c of [...this.all]) {
      waits.push(new Promise<void>((r) => (c.sock.closed ? r() : c.sock.once('close', () => r()))));
      c.die('transfer client closed');
    }
    return Promise.all(waits).then(() => {});
  }
}

export class TcpTransferClient implements TransferClient {
  private readonly s: Settings;
  private readonly pools = new Map<string, PeerPool>();
  private closed = false;

  constructor(opts: TcpClientOptions) {
    if (!opts.secret) throw new ConfigError('transfer client: an empty shared secret is not allowed');
    const bufferBytes = opts.bufferBytes ?? 1 << 20;
    this.s = {
      secret: Buffer.from(opts.secret, 'utf8'),
      maxConns: opts.maxConnectionsPerPeer ?? 4,
      idleTimeoutMs: opts.idleTimeoutMs ?? 30_000,
      peerTimeoutMs: opts.peerTimeoutMs ?? 30_000,
      buffersPerPull: opts.buffersPerPull ?? 4,
      writeMode: opts.writeMode ?? 'adaptive',
      pool: new BufferPool(bufferBytes, 32),
    };
    // The receive thread's buffer is faulted in now, not during the first pull.
    prepareReceiveBuffers(1);
  }

  private poolFor(address: string, upath: string): PeerPool {
    let p = this.pools.get(address);
    if (!p) {
      try {
        p = new PeerPool(address, this.s);
      } catch (err) {
        throw peerError(address, upath, err instanceof Error ? err.message : String(err));
      }
      this.pools.set(address, p);
    }
    return p;
  }

  async pull(address: string, req: PullRequest, destPath: string, opts: PullOptions = {}): Promise<PullResult> {
    if (!Number.isSafeInteger(req.size) || req.size < 0) {
      throw new DyadError('DYAD_EDIGEST', errnos.EINVAL, `pull ${JSON.stringify(req.upath)}: bad expected size ${req.size}`);
    }
    assertDigest(req.digest);
    // The owner validates paths; this only keeps an unencodable one off the wire.
    if (req.upath.includes('\0') || Buffer.byteLength(req.upath) > MAX_UPATH_BYTES) throw refused(req.upath, 'too long or contains NUL');
    if (this.closed) throw peerError(address, req.upath, 'transfer client closed');
    if (opts.signal?.aborted) throw abortError(address, req.upath, opts.signal.reason);
    const pool = this.poolFor(address, req.upath);
    const timeoutMs = opts.peerTimeoutMs ?? this.s.peerTimeoutMs;
    for (let attempt = 0; ; attempt++) {
      const conn = pool.takeIdle() ?? (await pool.acquire(req.upath, opts.signal, timeoutMs));
      if (opts.signal?.aborted) {
        pool.release(conn);
        throw abortError(address, req.upath, opts.signal.reason);
      }
      try {
        return await conn.run(req, destPath, opts, timeoutMs);
      } catch (err) {
        if (err instanceof StaleConnection) {
          if (attempt === 0 && !this.closed) continue;
          throw err.err;
        }
        throw err;
      }
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    const pools = [...this.pools.values()];
    this.pools.clear();
    await Promise.all(pools.map((p) => p.close()));
  }
}

export function tcpClient(opts: TcpClientOptions): TransferClient {
  return new TcpTransferClient(opts);
}
