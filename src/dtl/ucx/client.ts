/**
 * The consumer side of the UCX transfer: pulls files from owners' UCX
 * transfer servers into atomic temp files (sink.ts).
 *
 * Control: one authenticated TCP connection per peer, multiplexed (requests
 * carry ids), kept alive while in use and closed after `idleTimeoutMs`.
 * Bulk data never crosses it, so one connection does not serialise pulls.
 *
 * Data, per pull, after the owner's START:
 *  - mode am: the owner sends chunks as rendezvous active messages tagged
 *    with the pull's random token; each is fetched with ucp_am_recv_data_nbx
 *    straight into a registered buffer, written from there and digested in
 *    file order. A pull holds at most `buffersPerPull` buffers; chunk
 *    announcements beyond that wait (their bytes stay at the owner, whose
 *    sends stay pending: that is the backpressure).
 *  - mode get: the consumer reads the owner's registered mapping with
 *    ucp_get, `buffersPerPull` chunks in flight, then sends END.
 *
 * Every wait on the peer is bounded by peerTimeoutMs of silence (not while
 * the pull is held up by its own disk). Failures, aborts and timeouts stop
 * the pull at once and remove its temp file; chunk messages that arrive for
 * a finished pull are dropped, which completes the owner's sends.
 *
 * Silence is found by one sweep timer per client (Sweep), not by a timer per
 * pull: a 4 KiB pull is a few hundred microseconds, and arming and clearing a
 * timer plus switching the control socket's own timeout on and off around
 * each one was work it need not do. A silent peer is noticed between
 * peerTimeoutMs and a quarter more, and an unused connection is closed
 * between idleTimeoutMs and a quarter more.
 */
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { ConfigError, DyadError, errnoName, errnos } from '../../errors.js';
import { MAX_UPATH_BYTES, refused } from '../confine.js';
import { assertDigest } from '../digest.js';
import { abortError, authError, digestError, peerError, remoteError } from '../errors.js';
import { receiveChannel, receiveThreadAvailable } from '../receive.js';
import { Slots } from '../slots.js';
import type { IoMode } from '../inline.js';
import type { PullOptions, PullRequest, PullResult, TransferClient } from '../types.js';
import { isUcxError, type UcxChunkMover, type UcxRemoteKey } from './native.js';
import {
  DEFAULT_CHUNK_BYTES,
  FRAME_HEADER_BYTES,
  FrameType,
  INLINE_MAX,
  MAX_PAYLOAD,
  MAC_BYTES,
  Mode,
  NONCE_BYTES,
  PROTOCOL_VERSION,
  ProtocolError,
  TOKEN_BYTES,
  authMac,
  decodeChunkHeader,
  decodeData,
  decodeError,
  decodeHello,
  decodeStart,
  decodeWelcome,
  encodeAuth,
  encodeEnd,
  encodeGet,
  macEqual,
  parseAddress,
  parseFrame,
  type Frame,
  type ModeCode,
  type Start,
} from './protocol.js';
import type { EpEntry, RegisteredPool, UcxRuntime } from './runtime.js';
import { ChunkSink } from './sink.js';

export type UcxDataPath = 'am' | 'get';

export interface UcxClientOptions {
  secret: string;
  /** How bulk data moves: 'am' (owner sends, rendezvous; default) or 'get' (consumer reads with ucp_get). */
  dataPath?: UcxDataPath;
  /** An unused control connection is closed after this long. */
  idleTimeoutMs?: number;
  /** Default for PullOptions.peerTimeoutMs. */
  peerTimeoutMs?: number;
  /** Chunk buffers one pull may hold (being received, written or digested). */
  buffersPerPull?: number;
  /** Largest chunk an owner may announce (each buffer is this big). */
  maxChunkBytes?: number;
  /** Where received chunks are written; see inline.ts. Default 'adaptive'. */
  writeMode?: IoMode;
  /**
   * Mode am: receive chunks on the native chunk mover's own worker and thread
   * (UCX progress, copy, write and CRC off the event loop). Default: on
   * where the addon has it and setReceiveThreadEnabled has not turned it off.
   */
  receiveThread?: boolean;
  /**
   * Chunked pulls (files over INLINE_MAX) running at once from one owner;
   * more wait their turn (small files never wait). One UCX endpoint
   * carries them all, so more in parallel add no bandwidth, only buffers
   * and cache misses on both sides: 16 at once ran at 0.75-1.06 GB/s here,
   * 2 at once at 1.5-1.7 (1: 1.4-1.5, 4: 1.1-1.5). Default 2; 0: no limit.
   */
  maxBulkPerPeer?: number;
}

interface Settings {
  secret: Buffer;
  mode: ModeCode;
  idleTimeoutMs: number;
  peerTimeoutMs: number;
  buffersPerPull: number;
  maxChunkBytes: number;
  writeMode: IoMode;
  receiveThread: boolean;
  maxBulkPerPeer: number;
}

/** Internal: the pull failed on a reused connection before any reply; worth one retry. */
class StaleConnection {
  constructor(readonly err: DyadError) {}
}

type Buf = { buf: Buffer; region: import('./native.js').UcxRegion };

interface QueuedChunk {
  offset: number;
  length: number;
  desc: number;
  data: Buffer | undefined;
}

// Tokens come from a pooled random buffer: a synchronous randomBytes(8)
// per pull cost ~17 us on the project VM, a tenth of a small pull.
let tokenPool = Buffer.alloc(0);
function newToken(): Buffer {
  if (tokenPool.length < TOKEN_BYTES) tokenPool = randomBytes(TOKEN_BYTES * 512);
  const t = tokenPool.subarray(0, TOKEN_BYTES);
  tokenPool = tokenPool.subarray(TOKEN_BYTES);
  return t;
}

function describe(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

class Pull {
  readonly token = newToken();
  readonly id: number;
  gotResponse = false;
  private done = false;
  private endSent = false;
  private start: Start | null = null;
  private sink: ChunkSink | null = null;
  private pool: RegisteredPool | null = null;
  private readonly queued: QueuedChunk[] = [];
  private readonly seen = new Set<number>();
  private chunks = 0;
  private chunksPut = 0;
  private inFlight = 0;
  private nextOffset = 0;
  private ep: EpEntry | null = null;
  private rkey: UcxRemoteKey | null = null;
  /** The native chunk mover has this pull's chunks (conn.mover); bytes it had at the last look. */
  private onThread = false;
  private threadSeen = 0;
  private lastActivity = Date.now();
  private readonly unroute: () => void;
  private onAbort: (() => void) | null = null;
  readonly result: Promise<PullResult>;
  private resolve!: (r: PullResult) => void;
  private reject!: (e: DyadError | StaleConnection) => void;

  constructor(
    private readonly conn: ControlConn,
    private readonly rt: UcxRuntime,
    private readonly s: Settings,
    private readonly req: PullRequest,
    private readonly dest: string,
    private readonly opts: PullOptions,
    private readonly timeoutMs: number,
    private readonly reused: boolean,
  ) {
    this.id = conn.nextId();
    this.result = new Promise<PullResult>((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    // With the native chunk mover, chunks never reach this worker.
    this.unroute = conn.mover ? () => {} : rt.routeChunks(this.token.toString('hex'), (h, len, desc, data) => this.onChunk(h, len, desc, data));
    const signal = opts.signal;
    if (signal) {
      this.onAbort = () => this.fail(abortError(this.peer, req.upath, signal.reason));
      signal.addEventListener('abort', this.onAbort, { once: true });
    }
  }

  private get peer(): string {
    return this.conn.address;
  }

  // --- timing --------------------------------------------------------------

  private touch(): void {
    this.lastActivity = Date.now();
  }

  /** Called by the client's sweep: fails the pull once the peer has been silent for timeoutMs. */
  check(now: number): void {
    if (this.done) return;
    if (this.onThread) {
      const n = this.conn.mover!.received(this.token);
      if (n > this.threadSeen) {
        this.threadSeen = n;
        this.lastActivity = now;
      }
    }
    // Held up by our own disk (every buffer is waiting on a write): not the peer's silence.
    if (this.sink !== null && this.inFlight === 0 && this.sink.held > 0) this.lastActivity = now;
    if (now - this.lastActivity < this.timeoutMs) return;
    const progress = this.sink ? ` (${this.sink.bytes} of ${this.req.size} bytes received)` : '';
    const what = this.start ? `no data for ${this.timeoutMs} ms${progress}` : `no reply within ${this.timeoutMs} ms`;
    // A silent owner may also hold our requests: force its endpoint so they end.
    if (this.ep) this.rt.drop(this.ep, true);
    this.fail(peerError(this.peer, this.req.upath, what));
  }

  // --- control frames ------------------------------------------------------

  onFrame(f: Frame): void {
    if (this.done) return;
    this.touch();
    if (f.type !== FrameType.wait) this.gotResponse = true;
    if (f.type === FrameType.data) {
      const d = decodeData(f.payload);
      if (this.start) throw new ProtocolError('DATA after START');
      return this.inline(d.size, d.body);
    }
    if (f.type === FrameType.error) {
      const e = decodeError(f.payload);
      return this.fail(remoteError(this.peer, this.req.upath, e.status, e.detail));
    }
    if (f.type === FrameType.wait) return; // the owner is busy, not gone: touch() was enough
    if (f.type === FrameType.start) {
      if (this.start) throw new ProtocolError('second START');
      return this.onStart(decodeStart(f.payload));
    }
    throw new ProtocolError(`unexpected frame type ${f.type}`);
  }

  private openSink(size: number): boolean {
    if (size !== this.req.size) {
      this.fail(digestError(this.peer, this.req.upath, `size mismatch: expected ${this.req.size} bytes, peer has ${size}`));
      return false;
    }
    const sink = new ChunkSink(this.dest, { size, digest: this.req.digest }, { writeMode: this.s.writeMode, mode: this.opts.mode, fsync: this.opts.fsync }, this.peer, this.req.upath);
    try {
      sink.open();
    } catch (err) {
      this.fail(err as DyadError);
      return false;
    }
    sink.onError = (err) => this.fail(err);
    this.sink = sink;
    return true;
  }

  private inline(size: number, body: Buffer): void {
    if (!this.openSink(size)) return;
    // `body` is a view of the connection's read buffer, written before this returns.
    this.sink!.whole(body);
    this.complete(false);
  }

  private onStart(st: Start): void {
    this.start = st;
    if (st.chunkBytes > this.s.maxChunkBytes) {
      return this.fail(peerError(this.peer, this.req.upath, `owner's chunk size ${st.chunkBytes} exceeds our limit ${this.s.maxChunkBytes}`));
    }
    if (!this.openSink(st.size)) return;
    this.chunks = Math.ceil(st.size / st.chunkBytes);
    this.pool = this.rt.pool(st.chunkBytes);
    if (this.s.mode === Mode.get) {
      if (!st.remote) return this.fail(peerError(this.peer, this.req.upath, 'owner sent no remote key for get'));
      try {
        this.ep = this.rt.endpoint(this.conn.serverWorker!);
        this.rkey = this.ep.ep.unpackRkey(st.remote.rkey);
      } catch (err) {
        return this.fail(peerError(this.peer, this.req.upath, `UCX: ${describe(err)}`, err));
      }
      return this.issueGets();
    }
    if (this.conn.mover) return this.startThread(st);
    // Chunks that overtook START are validated now.
    for (const q of this.queued.splice(0)) {
      this.accept(q);
      if (this.done) return;
    }
  }

  // --- mode am on the native chunk mover ------------------------------------------

  private startThread(st: Start): void {
    const at = this.sink!.handOff();
    if (!at) return this.fail(this.sink!.failed ?? peerError(this.peer, this.req.upath, 'sink unusable'));
    if (st.size === 0) return this.complete(false);
    try {
      this.rt.startJob(this.token, at.fd, st.size, st.chunkBytes, this.s.buffersPerPull, at.algo, (_t, errno, crc, bytes, detail, fileError) =>
        this.threadDone(errno, crc, bytes, detail, fileError),
      );
    } catch (err) {
      return this.fail(peerError(this.peer, this.req.upath, `UCX chunk mover: ${describe(err)}`, err));
    }
    this.onThread = true;
    if (receiveChannel.hasSubscribers) receiveChannel.publish({ peer: this.peer, upath: this.req.upath, offset: 0, length: st.size });
  }

  private threadDone(errno: number, crc: number, bytes: number, detail: string, fileError: boolean): void {
    if (this.done) return;
    this.touch();
    if (errno === 0) {
      this.sink!.absorb(bytes, crc);
      return this.complete(false);
    }
    const name = errnoName(errno);
    // The sink reports a write failure through onError, which fails this pull.
    if (fileError) return this.sink!.failWrite(Object.assign(new Error(`${name} writing the received bytes: ${detail}`), { code: name }));
    this.fail(peerError(this.peer, this.req.upath, detail));
  }

  // --- mode am: chunks announced by the owner ---------------------------------

  private onChunk(header: Buffer, length: number, desc: number, data: Buffer | undefined): void {
    const h = decodeChunkHeader(header);
    if (this.done || !h) {
      if (desc) this.rt.worker.amRelease(desc);
      return;
    }
    this.touch();
    const q: QueuedChunk = { offset: h.offset, length, desc, data };
    if (!this.start) {
      // Data can overtake START (different channels); the owner's window bounds this.
      if (this.queued.length >= 64) return this.badChunk(q, 'too many chunks before START');
      this.queued.push(q);
      return;
    }
    this.accept(q);
  }

  private accept(q: QueuedChunk): void {
    const st = this.start!;
    const idx = q.offset / st.chunkBytes;
    const want = Math.min(st.chunkBytes, st.size - q.offset);
    if (!Number.isInteger(idx) || q.offset >= st.size || q.length !== want || this.seen.has(idx)) {
      return this.badChunk(q, `bad chunk at offset ${q.offset} of ${q.length} bytes`);
    }
    this.seen.add(idx);
    this.queued.push(q);
    this.pump();
  }

  private badChunk(q: QueuedChunk, why: string): void {
    if (q.desc) this.rt.worker.amRelease(q.desc);
    this.fail(peerError(this.peer, this.req.upath, `protocol error: ${why}`));
  }

  private budget(): boolean {
    return this.inFlight + (this.sink?.held ?? 0) < this.s.buffersPerPull;
  }

  private pump(): void {
    if (!this.start) return;
    while (!this.done && this.queued.length > 0 && this.budget()) {
      const q = this.queued.shift()!;
      if (!q.desc) {
        // Eager: UCX already delivered the bytes (copied out by the addon).
        this.put(q.offset, q.data ?? Buffer.alloc(0), () => {});
        continue;
      }
      const b = this.pool!.take();
      this.inFlight++;
      this.rt.worker.amRecv(q.desc, b.buf.subarray(0, q.length), b.region).then(
        (n) => {
          this.inFlight--;
          if (this.done) return this.pool!.give(b);
          if (n !== q.length) {
            this.pool!.give(b);
            return this.fail(peerError(this.peer, this.req.upath, `chunk at ${q.offset}: ${n} of ${q.length} bytes arrived`));
          }
          this.touch();
          this.put(q.offset, b.buf.subarray(0, n), () => this.giveBack(b));
          this.pump();
        },
        (err: unknown) => {
          this.inFlight--;
          this.pool!.give(b);
          this.fail(peerError(this.peer, this.req.upath, `UCX receive failed: ${describe(err)}`, err));
        },
      );
    }
  }

  private giveBack(b: Buf): void {
    this.pool!.give(b);
    if (this.done) return;
    this.touch();
    if (this.s.mode === Mode.get) this.issueGets();
    else this.pump();
  }

  private put(offset: number, buf: Buffer, release: () => void): void {
    this.sink!.put(offset, buf, release);
    if (++this.chunksPut === this.chunks) this.complete(this.s.mode === Mode.get);
  }

  // --- mode get: we read the owner's mapping ---------------------------------

  private issueGets(): void {
    const st = this.start!;
    const remote = st.remote!;
    while (!this.done && this.nextOffset < st.size && this.budget()) {
      const offset = this.nextOffset;
      const len = Math.min(st.chunkBytes, st.size - offset);
      this.nextOffset += len;
      const b = this.pool!.take();
      const rkey = this.rkey!;
      this.inFlight++;
      this.ep!.run((e) => e.get(b.buf.subarray(0, len), remote.address + BigInt(offset), rkey, b.region)).then(
        () => {
          this.inFlight--;
          if (this.done) {
            this.pool!.give(b);
            return this.afterGets();
          }
          this.touch();
          this.put(offset, b.buf.subarray(0, len), () => this.giveBack(b));
          this.issueGets();
        },
        (err: unknown) => {
          this.inFlight--;
          this.pool!.give(b);
          if (this.done) return this.afterGets();
          const what = isUcxError(err) ? `UCX get failed: ${err.message}` : describe(err);
          this.fail(peerError(this.peer, this.req.upath, what, err));
          this.afterGets();
        },
      );
    }
  }

  /** Once no get is in flight: the key can go, and the owner may unmap (END). */
  private afterGets(): void {
    if (this.inFlight > 0) return;
    if (this.rkey) {
      this.rkey.destroy();
      this.rkey = null;
    }
    this.sendEnd();
  }

  private sendEnd(): void {
    if (this.endSent) return;
    this.endSent = true;
    this.conn.send(encodeEnd(this.id));
  }

  // --- ending --------------------------------------------------------------

  private finishCommon(failed: boolean): void {
    this.done = true;
    this.unroute();
    // Also for a pull that never started a job: chunks of it may be waiting there.
    if (this.conn.mover && (this.onThread || failed)) this.rt.forgetJob(this.token);
    if (this.onAbort) this.opts.signal?.removeEventListener('abort', this.onAbort);
    this.conn.forget(this);
    for (const q of this.queued.splice(0)) if (q.desc) this.rt.worker.amRelease(q.desc);
  }

  private complete(viaGet: boolean): void {
    if (this.done) return;
    this.finishCommon(false);
    if (viaGet) this.afterGets();
    this.sink!.finish().then(
      (r) => this.resolve(r),
      (err: unknown) => this.reject(err instanceof DyadError ? err : peerError(this.peer, this.req.upath, String(err))),
    );
  }

  /** Ends the pull with `err`: stops the owner, drops the temp file. */
  fail(err: DyadError | StaleConnection): void {
    if (this.done) return;
    this.finishCommon(true);
    if (this.s.mode === Mode.get) this.afterGets();
    else this.sendEnd();
    const sink = this.sink;
    if (sink) sink.abort().then(() => this.reject(err));
    else this.reject(err);
  }

  /** The control connection died under this pull. */
  connectionLost(detail: string, cause?: unknown, err?: DyadError): void {
    if (this.done) return;
    if (err) return this.fail(err);
    const progress = this.sink ? ` after ${this.sink.bytes} of ${this.req.size} bytes` : '';
    const e = peerError(this.peer, this.req.upath, `${detail}${progress}`, cause);
    this.fail(this.reused && !this.gotResponse ? new StaleConnection(e) : e);
  }
}

interface ConnectFailure {
  detail: string;
  cause?: unknown;
  err?: DyadError;
}

class ControlConn {
  readonly sock: net.Socket;
  readonly ready: Promise<void>;
  state: 'hello' | 'welcome' | 'ready' | 'dead' = 'hello';
  serverWorker: Buffer | null = null;
  /** Mode am with the native chunk mover: the owner sends this connection's chunks to it. */
  readonly mover: UcxChunkMover | null;
  uses = 0;
  // Frames are read straight into this buffer (no stream machinery per
  // reply) and handed out as views of it: handlers copy what they keep.
  private readonly scratch = Buffer.allocUnsafe(2 * (MAX_PAYLOAD + FRAME_HEADER_BYTES));
  private sStart = 0;
  private sEnd = 0;
  private readonly nonce = randomBytes(NONCE_BYTES);
  private serverNonce: Buffer | null = null;
  private handshake: { resolve: () => void; reject: (f: ConnectFailure) => void } | null = null;
  private readonly pulls = new Map<number, Pull>();
  private ids = 1;
  /** When the last pull ended (Date.now()), for the idle timeout. */
  private idleSince = Date.now();

  constructor(
    readonly address: string,
    host: string,
    port: number,
    private readonly s: Settings,
    private readonly rt: UcxRuntime,
    connectTimeoutMs: number,
    private readonly onDead: (c: ControlConn) => void,
  ) {
    this.mover = s.mode === Mode.am && s.receiveThread ? rt.mover('rx') : null;
    this.ready = new Promise<void>((resolve, reject) => (this.handshake = { resolve, reject }));
    this.ready.catch(() => {});
    this.sock = net.connect({
      host,
      port,
      noDelay: true,
      onread: { buffer: () => this.scratch.subarray(this.sEnd), callback: (n: number) => this.onRead(n) },
    });
    // Until the handshake is done; after it, the client's sweep does the timing.
    this.sock.setTimeout(connectTimeoutMs);
    this.sock.on('timeout', () => {
      if (this.state !== 'ready') this.die('no handshake from peer in time');
    });
    this.sock.on('error', (err: NodeJS.ErrnoException) => {
      this.die(`${this.state === 'hello' && !this.serverNonce ? 'cannot connect' : 'connection error'}: ${err.message}`, err);
    });
    this.sock.on('close', () => this.die('connection closed by peer'));
  }

  nextId(): number {
    const id = this.ids;
    this.ids = (this.ids + 1) >>> 0 || 1;
    return id;
  }

  send(buf: Buffer): void {
    if (this.state !== 'dead') this.sock.write(buf);
  }

  start(p: Pull, mode: ModeCode, upath: string): void {
    this.uses++;
    this.pulls.set(p.id, p);
    // A pull in progress keeps the process alive (the sweep timer does not).
    if (this.pulls.size === 1) this.sock.ref();
    this.sock.write(encodeGet(p.id, mode, p.token, upath));
  }

  forget(p: Pull): void {
    if (this.pulls.get(p.id) !== p) return;
    this.pulls.delete(p.id);
    if (this.pulls.size === 0 && this.state === 'ready') {
      this.sock.unref();
      this.idleSince = Date.now();
    }
  }

  /** The client's sweep: times out silent peers' pulls, closes the connection once idle long enough. */
  sweep(now: number): void {
    if (this.state !== 'ready') return;
    if (this.pulls.size === 0) {
      if (now - this.idleSince >= this.s.idleTimeoutMs) this.die('idle');
      return;
    }
    for (const p of this.pulls.values()) p.check(now);
  }

  private onRead(n: number): boolean {
    if (this.state === 'dead') return false;
    this.sEnd += n;
    try {
      for (;;) {
        const r = parseFrame(this.scratch, this.sStart, this.sEnd);
        if (!r) break;
        this.sStart = r.next;
        this.onFrame(r.frame);
        if (this.isDead) return false;
      }
    } catch (err) {
      // Throwing out of an onread callback would crash the process.
      this.die(err instanceof ProtocolError ? `protocol error: ${err.message}` : `internal error: ${String(err)}`, err);
      return false;
    }
    if (this.sStart === this.sEnd) {
      this.sStart = this.sEnd = 0;
    } else if (this.sEnd > this.scratch.length / 2) {
      // A partial frame is never longer than half the buffer, so this leaves room for it.
      this.scratch.copyWithin(0, this.sStart, this.sEnd);
      this.sEnd -= this.sStart;
      this.sStart = 0;
    }
    return true;
  }

  private onFrame(f: Frame): void {
    if (this.state === 'hello') {
      if (f.type !== FrameType.hello) throw new ProtocolError(`expected HELLO, got frame type ${f.type}`);
      const h = decodeHello(f.payload);
      if (h.version !== PROTOCOL_VERSION) throw new ProtocolError(`peer speaks protocol ${h.version}, we speak ${PROTOCOL_VERSION}`);
      this.serverNonce = Buffer.from(h.nonce);
      const data = this.mover?.address() ?? this.rt.address;
      this.sock.write(encodeAuth(this.nonce, authMac(this.s.secret, 'client', this.serverNonce, this.nonce, data), data));
      this.state = 'welcome';
      return;
    }
    if (this.state === 'welcome') {
      if (f.type === FrameType.denied) {
        return this.die('', undefined, authError(this.address, `rejected our credentials (${f.payload.toString('utf8')})`));
      }
      if (f.type !== FrameType.welcome || f.payload.length <= MAC_BYTES) throw new ProtocolError('expected WELCOME');
      const w = decodeWelcome(f.payload);
      if (!macEqual(w.mac, authMac(this.s.secret, 'server', this.serverNonce!, this.nonce, w.workerAddress))) {
        return this.die('', undefined, authError(this.address, 'could not prove it holds the shared secret'));
      }
      this.serverWorker = Buffer.from(w.workerAddress);
      this.state = 'ready';
      this.sock.setTimeout(0);
      this.sock.unref();
      this.idleSince = Date.now();
      this.handshake?.resolve();
      this.handshake = null;
      return;
    }
    if (f.payload.length < 4) throw new ProtocolError(`short frame type ${f.type}`);
    const p = this.pulls.get(f.payload.readUInt32BE(0));
    // Replies to pulls we gave up on (aborted, timed out) are expected.
    if (p) p.onFrame(f);
  }

  die(detail: string, cause?: unknown, err?: DyadError): void {
    if (this.state === 'dead') return;
    this.state = 'dead';
    this.sock.destroy();
    this.onDead(this);
    if (this.handshake) {
      this.handshake.reject(err ? { detail, err } : { detail, cause });
      this.handshake = null;
    }
    for (const p of [...this.pulls.values()]) p.connectionLost(detail || 'connection lost', cause, err);
    this.pulls.clear();
  }

  get isDead(): boolean {
    return this.state === 'dead';
  }

  get closed(): Promise<void> {
    return new Promise<void>((r) => (this.sock.closed ? r() : this.sock.once('close', () => r())));
  }
}

/**
 * One interval timer for all of a client's connections and pulls. It runs
 * while the client has connections, every quarter of the shortest timeout
 * asked for (5 ms to 1 s), and never keeps the process alive by itself.
 */
class Sweep {
  private timer: NodeJS.Timeout | null = null;
  private everyMs = Infinity;

  constructor(private readonly conns: Map<string, ControlConn>) {}

  /** A silence of `ms` must be noticed: sweep at least every quarter of it. */
  need(ms: number): void {
    const every = Math.min(1000, Math.max(5, Math.floor(ms / 4)));
    if (this.timer !== null && every >= this.everyMs) return;
    if (this.timer !== null) clearInterval(this.timer);
    this.everyMs = every;
    this.timer = setInterval(this.run, every).unref();
  }

  stop(): void {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
    this.everyMs = Infinity;
  }

  private readonly run = (): void => {
    const now = Date.now();
    for (const c of this.conns.values()) c.sweep(now);
    if (this.conns.size === 0) this.stop();
  };
}

export class UcxTransferClient implements TransferClient {
  private readonly s: Settings;
  private readonly conns = new Map<string, ControlConn>();
  private readonly bulk = new Map<string, Slots>();
  private readonly running = new Set<Pull>();
  private readonly sweep = new Sweep(this.conns);
  private closed = false;

  constructor(
    opts: UcxClientOptions,
    private readonly rt: UcxRuntime,
  ) {
    if (!opts.secret) throw new ConfigError('transfer client: an empty shared secret is not allowed');
    this.s = {
      secret: Buffer.from(opts.secret, 'utf8'),
      mode: opts.dataPath === 'get' ? Mode.get : Mode.am,
      idleTimeoutMs: opts.idleTimeoutMs ?? 30_000,
      peerTimeoutMs: opts.peerTimeoutMs ?? 30_000,
      buffersPerPull: Math.max(1, opts.buffersPerPull ?? 10),
      maxChunkBytes: opts.maxChunkBytes ?? 64 << 20,
      writeMode: opts.writeMode ?? 'adaptive',
      receiveThread: opts.receiveThread ?? receiveThreadAvailable(),
      maxBulkPerPeer: Math.max(0, opts.maxBulkPerPeer ?? 2),
    };
    // The receive thread and one pull's buffers, for the chunk size owners use unless configured otherwise.
    if (this.s.mode === Mode.am && this.s.receiveThread) rt.prepareMover('rx', DEFAULT_CHUNK_BYTES, this.s.buffersPerPull);
  }

  private connection(address: string, upath: string, timeoutMs: number): ControlConn {
    const have = this.conns.get(address);
    if (have && have.state !== 'dead') return have;
    let hp: { host: string; port: number };
    try {
      hp = parseAddress(address);
    } catch (err) {
      throw peerError(address, upath, describe(err));
    }
    const c = new ControlConn(address, hp.host, hp.port, this.s, this.rt, timeoutMs, (dead) => {
      if (this.conns.get(address) === dead) this.conns.delete(address);
    });
    this.conns.set(address, c);
    this.sweep.need(Math.min(this.s.idleTimeoutMs, this.s.peerTimeoutMs));
    return c;
  }

  private async ready(c: ControlConn, upath: string, signal: AbortSignal | undefined): Promise<void> {
    if (c.state === 'ready') return;
    let onAbort: (() => void) | null = null;
    const aborted = new Promise<never>((_, reject) => {
      if (!signal) return;
      onAbort = () => reject(abortError(c.address, upath, signal.reason));
      signal.addEventListener('abort', onAbort, { once: true });
    });
    try {
      await Promise.race([
        c.ready.catch((f: ConnectFailure) => {
          throw f.err ?? peerError(c.address, upath, f.detail, f.cause);
        }),
        aborted,
      ]);
    } finally {
      if (onAbort) signal?.removeEventListener('abort', onAbort);
    }
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
    const timeoutMs = opts.peerTimeoutMs ?? this.s.peerTimeoutMs;
    const slots = req.size > INLINE_MAX && this.s.maxBulkPerPeer > 0 ? this.bulkSlots(address) : null;
    if (slots) {
      try {
        await slots.acquire(opts.signal);
      } catch (reason) {
        throw abortError(address, req.upath, reason);
      }
    }
    try {
      return await this.pullNow(address, req, destPath, opts, timeoutMs);
    } finally {
      slots?.release();
      if (slots && slots.idle) this.bulk.delete(address);
    }
  }

  private bulkSlots(address: string): Slots {
    let s = this.bulk.get(address);
    if (!s) this.bulk.set(address, (s = new Slots(this.s.maxBulkPerPeer)));
    return s;
  }

  private async pullNow(address: string, req: PullRequest, destPath: string, opts: PullOptions, timeoutMs: number): Promise<PullResult> {
    for (let attempt = 0; ; attempt++) {
      const c = this.connection(address, req.upath, timeoutMs);
      const reused = c.uses > 0;
      if (c.state !== 'ready') await this.ready(c, req.upath, opts.signal);
      if (opts.signal?.aborted) throw abortError(address, req.upath, opts.signal.reason);
      if (this.closed) throw peerError(address, req.upath, 'transfer client closed');
      if (c.isDead) {
        if (attempt < 2) continue;
        throw peerError(address, req.upath, 'connection lost right after the handshake');
      }
      const p = new Pull(c, this.rt, this.s, req, destPath, opts, timeoutMs, reused);
      this.sweep.need(timeoutMs);
      c.start(p, this.s.mode, req.upath);
      this.running.add(p);
      try {
        return await p.result;
      } catch (err) {
        if (err instanceof StaleConnection) {
          if (attempt === 0 && !this.closed) continue;
          throw err.err;
        }
        throw err;
      } finally {
        this.running.delete(p);
      }
    }
  }

  /** Fails pulls in progress (DYAD_EPEER), closes connections, then lets go of the UCX worker. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const conns = [...this.conns.values()];
    this.conns.clear();
    this.sweep.stop();
    const waits = conns.map((c) => c.closed);
    for (const c of conns) c.die('transfer client closed');
    await Promise.all(waits);
    await Promise.all([...this.running].map((p) => p.result.catch(() => {})));
    this.rt.release();
  }
}
