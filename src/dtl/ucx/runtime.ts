/**
 * The per-process UCX state a UCX backend instance shares between its
 * transfer server and client: one worker (one ucp context) driven from the
 * event loop, endpoints cached per peer worker address, pools of registered
 * buffers, the routing of incoming chunk messages to the pull they belong
 * to, and the two native chunk movers that take chunked transfers off the
 * event loop where the addon has them.
 *
 * Endpoints: created on first use, kept while healthy (wire-up costs a
 * round trip or more), evicted least-recently-used above `maxEndpoints`
 * (only when idle) and dropped the moment UCX reports them failed, so the
 * next transfer reconnects. A peer that stops answering is failed by the
 * transfer timeouts, which force-close its endpoint (UCX then cancels every
 * request on it, so nothing waits forever).
 */
import { errnos, ConfigError } from '../../errors.js';
import type { DigestAlgo } from '../digest.js';
import type { UcxAddon, UcxAmHandler, UcxChunkDone, UcxChunkMover, UcxEndpoint, UcxRegion, UcxWorker } from './native.js';
import { AM_CHUNK } from './protocol.js';

const SHM_TRANSPORT = /^(self|sysv|posix|cma|knem|xpmem)\//;

/** Parses the "resource N : md M dev K flags -- tl/dev" lines of ucp_context_print_info. */
export function transportsOf(contextInfo: string): string[] {
  const out: string[] = [];
  for (const m of contextInfo.matchAll(/resource\s+\d+\s*:.*--\s*(\S+)/g)) out.push(m[1]!);
  return out;
}

export interface UcxRuntimeOptions {
  /** UCX options (keys without "UCX_", e.g. TLS, NET_DEVICES) overriding the environment. */
  config?: Record<string, string>;
  /** Idle endpoints kept before the least recently used is closed. */
  maxEndpoints?: number;
  /**
   * Microseconds the worker keeps polling after going quiet while requests
   * are in flight, before sleeping on its event fd (see bench/transfer-ucx.ts).
   */
  spinUs?: number;
}

export class EpEntry {
  inflight = 0;
  lastUse = Date.now();
  failed: string | null = null;
  constructor(
    readonly key: string,
    readonly ep: UcxEndpoint,
  ) {}

  /** Runs an operation on the endpoint, counting it as in flight. */
  async run<T>(op: (ep: UcxEndpoint) => Promise<T>): Promise<T> {
    this.inflight++;
    this.lastUse = Date.now();
    try {
      return await op(this.ep);
    } finally {
      this.inflight--;
      this.lastUse = Date.now();
    }
  }
}

/** Registered buffers of one size, recycled: registration is per buffer, not per transfer. */
export class RegisteredPool {
  private readonly free: { buf: Buffer; region: UcxRegion }[] = [];
  constructor(
    private readonly worker: UcxWorker,
    readonly size: number,
    private readonly maxIdle: number,
  ) {}

  take(): { buf: Buffer; region: UcxRegion } {
    const b = this.free.pop();
    if (b) return b;
    const buf = Buffer.allocUnsafeSlow(this.size);
    return { buf, region: this.worker.register(buf) };
  }

  give(b: { buf: Buffer; region: UcxRegion }): void {
    if (this.free.length < this.maxIdle) this.free.push(b);
    else b.region.release();
  }

}

export type ChunkRoute = UcxAmHandler;

export type MoverRole = 'rx' | 'tx';

export class UcxRuntime {
  readonly worker: UcxWorker;
  readonly address: Buffer;
  private readonly eps = new Map<string, EpEntry>();
  private readonly routes = new Map<string, ChunkRoute>();
  private readonly pools = new Map<number, RegisteredPool>();
  private readonly maxEndpoints: number;
  readonly peerErrors: boolean;
  private users = 0;
  private closed = false;
  private readonly movers: { rx?: UcxChunkMover | null; tx?: UcxChunkMover | null } = {};
  private readonly rxJobs = new Map<string, UcxChunkDone>();
  private readonly txJobs = new Map<string, UcxChunkDone>();
  private readonly config: Record<string, string>;

  constructor(
    readonly addon: UcxAddon,
    opts: UcxRuntimeOptions,
    private readonly onClosed: () => void,
  ) {
    try {
      this.worker = new addon.Worker(opts.config ?? {}, `dyad-${process.pid}`);
    } catch (err) {
      throw new ConfigError(`UCX: cannot create a worker: ${err instanceof Error ? err.message : String(err)} (check UCX_TLS / UCX_NET_DEVICES)`, errnos.ENODEV);
    }
    this.config = opts.config ?? {};
    this.address = this.worker.address();
    this.worker.setSpin(opts.spinUs ?? 0);
    // UCX 1.13's shared-memory transports cannot report a dead peer, so
    // endpoints that require it skip them (or fail when nothing else is
    // configured). When the context has only those, endpoints go without,
    // and the transfer timeouts stand in for peer-failure detection.
    this.peerErrors = transportsOf(this.worker.info()).some((tl) => !SHM_TRANSPORT.test(tl));
    this.maxEndpoints = opts.maxEndpoints ?? 128;
    this.worker.setAmHandler(AM_CHUNK, (header, length, desc, data) => {
      const token = header.length >= 8 ? header.toString('hex', 0, 8) : '';
      const route = this.routes.get(token);
      if (route) route(header, length, desc, data);
      // Chunks of a pull that ended (aborted, failed): dropping completes the owner's send.
      else if (desc) this.worker.amRelease(desc);
    });
  }

  retain(): this {
    this.users++;
    return this;
  }

  /** Drops one user; the last one closes the worker (endpoints forced, buffers unregistered). */
  release(): void {
    if (--this.users > 0 || this.closed) return;
    this.closed = true;
    // The worker goes first: it releases every registration itself, after
    // the requests that may still reference them (see Worker::Close).
    this.worker.close();
    this.movers.rx?.close();
    this.movers.tx?.close();
    this.rxJobs.clear();
    this.txJobs.clear();
    this.pools.clear();
    this.eps.clear();
    this.routes.clear();
    this.onClosed();
  }

  get isClosed(): boolean {
    return this.closed;
  }

  pool(size: number): RegisteredPool {
    let p = this.pools.get(size);
    if (!p) {
      p = new RegisteredPool(this.worker, size, 16);
      this.pools.set(size, p);
    }
    return p;
  }

  /**
   * The native chunk movers (each a worker of its own on a thread of its
   * own, native/ucx/mover.h), created on first use (a client and a server
   * start theirs when they are made, see prepareMover): 'rx' receives this
   * process's pulls, 'tx' sends what its server serves. Two, so a node that
   * both serves and pulls (all-to-all) uses a core for each direction. Null
   * where the addon lacks them or one cannot start (the caller then uses
   * this worker on the event loop).
   */
  mover(role: MoverRole): UcxChunkMover | null {
    const have = this.movers[role];
    if (have !== undefined || this.closed) return have ?? null;
    this.movers[role] = null;
    const Ctor = this.addon.ChunkMover;
    if (!Ctor) return null;
    const jobs = role === 'rx' ? this.rxJobs : this.txJobs;
    try {
      this.movers[role] = new Ctor(this.config, `dyad-${role}-${process.pid}`, (token, ...rest) => jobs.get(token.toString('hex'))?.(token, ...rest), AM_CHUNK, this.peerErrors);
    } catch {
      this.movers[role] = null;
    }
    return this.movers[role] ?? null;
  }

  /** Starts a mover now and has it ready `count` buffers of `bytes`, so the first transfer pays for neither. */
  prepareMover(role: MoverRole, bytes: number, count: number): void {
    this.mover(role)?.reserve(bytes, count);
  }

  /** The movers' counters, for those that were started. */
  moverStats(): { rx?: ReturnType<UcxChunkMover['stats']>; tx?: ReturnType<UcxChunkMover['stats']> } {
    return { rx: this.movers.rx?.stats(), tx: this.movers.tx?.stats() };
  }

  /** Starts a receive job on the 'rx' mover; `done` is called once, unless `forgetJob` comes first. */
  startJob(token: Buffer, fd: number, size: number, chunkBytes: number, buffers: number, algo: DigestAlgo, done: UcxChunkDone): void {
    this.rxJobs.set(token.toString('hex'), done);
    this.movers.rx!.start(token, fd, size, chunkBytes, buffers, algo);
  }

  forgetJob(token: Buffer): void {
    this.rxJobs.delete(token.toString('hex'));
    this.movers.rx?.cancel(token);
  }

  /** Starts a send job on the 'tx' mover; `done` is called once, unless `forgetSend` comes first. */
  startSend(token: Buffer, peer: Uint8Array, fd: number, size: number, chunkBytes: number, window: number, done: UcxChunkDone): void {
    this.txJobs.set(token.toString('hex'), done);
    this.movers.tx!.send(token, peer, fd, size, chunkBytes, window);
  }

  forgetSend(token: Buffer, force = false): void {
    this.txJobs.delete(token.toString('hex'));
    this.movers.tx?.cancelSend(token, force);
  }

  routeChunks(token: string, fn: ChunkRoute): () => void {
    this.routes.set(token, fn);
    return () => {
      if (this.routes.get(token) === fn) this.routes.delete(token);
    };
  }

  /** The cached endpoint to a peer worker, created if needed. Throws a UCX-coded Error. */
  endpoint(address: Buffer): EpEntry {
    const key = address.toString('base64');
    const have = this.eps.get(key);
    if (have && !have.failed) {
      have.lastUse = Date.now();
      return have;
    }
    this.evictIdle();
    let entry: EpEntry | null = null;
    const ep = this.worker.connect(
      address,
      (code) => {
        if (!entry) return;
        entry.failed = code;
        this.drop(entry, true);
      },
      this.peerErrors,
    );
    entry = new EpEntry(key, ep);
    this.eps.set(key, entry);
    return entry;
  }

  /** Forgets an endpoint and closes it (forced: cancels whatever is in flight on it). */
  drop(entry: EpEntry, force: boolean): void {
    if (this.eps.get(entry.key) === entry) this.eps.delete(entry.key);
    if (this.closed) return;
    entry.ep.close(force || entry.failed !== null).catch(() => {});
  }

  private evictIdle(): void {
    if (this.eps.size < this.maxEndpoints) return;
    let lru: EpEntry | null = null;
    for (const e of this.eps.values()) if (e.inflight === 0 && (!lru || e.lastUse < lru.lastUse)) lru = e;
    if (lru) this.drop(lru, false);
  }

  /** Transports in use: the context's configuration and, per endpoint (this worker's and the chunk mover's), its lanes. */
  describe(): { context: string; endpoints: string[] } {
    const mine = [...this.eps.values()].map((e) => e.ep.info());
    return { context: this.worker.info(), endpoints: [...mine, ...(this.movers.tx?.endpoints() ?? [])] };
  }
}
