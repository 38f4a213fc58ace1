/**
 * One client connection to the embedded KVS server: framing, authentication,
 * request dispatch onto the store, pending waits and subscriptions.
 *
 * Requests are dispatched in arrival order and every store read and mutation is
 * applied synchronously during dispatch, so on one connection the replies and
 * change events appear in the order the store changed. Replies to mutations wait
 * for durability and may overtake each other; request ids match them up.
 *
 * A connection that breaks the protocol (bad length, bad JSON, a request without
 * an id) is closed: it is either buggy or hostile, and the server's other
 * connections are unaffected.
 */
import type { Socket } from 'node:net';
import { DyadError } from '../../errors.js';
import { accessDenied, invalidArgument, kvsError, timedOut } from '../errors.js';
import { checkNamespace } from '../validate.js';
import { authProof, isNonce, newNonce, proofMatches, scopeOf } from './auth.js';
import {
  bytesOf,
  decodeContent,
  encodeFrame,
  FrameDecoder,
  isObject,
  LIST_PAGE,
  NAMESPACE_PAGE,
  PROTOCOL,
  RANK_PAGE,
  toWireError,
  type HelloFrame,
} from './protocol.js';
import type { KvsStore, Waiter } from './store.js';
import { TurnBatcher } from './batch.js';

export interface SessionLimits {
  /** Largest client frame accepted. */
  maxFrameBytes: number;
  /** A connection must authenticate within this time. */
  authTimeoutMs: number;
  maxWaits: number;
  /** Unsent reply bytes tolerated before the client is considered stuck. */
  maxBacklogBytes: number;
}

export interface SessionHost {
  readonly store: KvsStore;
  readonly adminSecret: string;
  readonly limits: SessionLimits;
  createNamespace(ns: string, secret?: string): Promise<string>;
  removeNamespace(ns: string): Promise<void>;
  subscribe(ns: string, session: Session): void;
  unsubscribe(ns: string, session: Session): void;
  detach(session: Session): void;
  /** Runs a mutation on behalf of `session` (its own change events leave out the bytes it pushed). */
  fromSession<T>(session: Session, fn: () => T): T;
  /** A rank was (re)registered: its lease starts again. */
  rankSeen(ns: string, rank: number): void;
  /** Sends change events held back for a burst: called before every reply. */
  flushEvents(): void;
  log(level: 'info' | 'warn', msg: string): void;
}

/** Brute force is hopeless against 256-bit secrets; this just stops wasted work. */
const MAX_AUTH_FAILURES = 5;
/** Returned by a handler that replies later (a wait). */
const DEFERRED = Symbol('deferred');

/** A reply value, a promise of one, or DEFERRED. */
type Handled = unknown;

function optString(v: unknown, what: string): string | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string') throw invalidArgument(`${what} must be a string`);
  return v;
}

export class Session {
  readonly peer: string;
  private readonly decoder: FrameDecoder;
  private readonly nonce = newNonce();
  private readonly grants = new Set<string>();
  private admin = false;
  private failures = 0;
  private endAfterReply = false;
  private closed = false;
  private cleaned = false;
  private readonly waits = new Map<number, { ns: string; upath: string; waiter: Waiter; timer: NodeJS.Timeout | undefined }>();
  private readonly watched = new Set<string>();
  private readonly authTimer: NodeJS.Timeout;
  private readonly out: TurnBatcher;

  constructor(
    private readonly host: SessionHost,
    private readonly socket: Socket,
  ) {
    this.peer = `${socket.remoteAddress ?? '?'}:${socket.remotePort ?? '?'}`;
    this.decoder = new FrameDecoder(host.limits.maxFrameBytes);
    this.out = new TurnBatcher(socket);
    socket.setNoDelay(true);
    socket.setKeepAlive(true, 30_000);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => host.log('info', `KVS connection ${this.peer}: ${err.message}`));
    socket.on('close', () => this.cleanup());
    this.authTimer = setTimeout(() => this.close('did not authenticate in time'), host.limits.authTimeoutMs);
    this.authTimer.unref();
    const hello: HelloFrame = { hello: PROTOCOL, nonce: this.nonce, keyDepth: host.store.keyDepth, keyBins: host.store.keyBins };
    this.send(encodeFrame(hello));
  }

  send(frame: Buffer): void {
    if (this.closed) return;
    this.out.write(frame);
    if (this.socket.writableLength > this.host.limits.maxBacklogBytes) this.close('it is not reading its replies');
  }

  close(reason: string): void {
    if (this.closed) return;
    this.host.log('info', `KVS connection ${this.peer} closed: ${reason}`);
    this.socket.destroy();
    this.cleanup();
  }

  /** The namespace is gone: drop the grant so a recreated namespace needs its new secret. */
  revoke(ns: string): void {
    this.grants.delete(ns);
    this.watched.delete(ns);
  }

  private cleanup(): void {
    if (this.cleaned) return;
    this.cleaned = true;
    this.closed = true;
    clearTimeout(this.authTimer);
    for (const w of this.waits.values()) {
      clearTimeout(w.timer);
      this.host.store.removeWaiter(w.ns, w.upath, w.waiter);
    }
    this.waits.clear();
    for (const ns of this.watched) this.host.unsubscribe(ns, this);
    this.watched.clear();
    this.host.detach(this);
  }

  private onData(chunk: Buffer): void {
    let msgs: unknown[];
    try {
      msgs = this.decoder.push(chunk);
    } catch (err) {
      this.close(`protocol error: ${(err as Error).message}`);
      return;
    }
    for (const m of msgs) {
      if (this.closed) return;
      this.handle(m);
    }
  }

  private handle(m: unknown): void {
    if (!isObject(m) || typeof m['op'] !== 'string') {
      this.close('protocol error: a frame is not a request');
      return;
    }
    if (m['op'] === 'cancel') {
      this.cancel(m['target']);
      return;
    }
    const id = m['id'];
    if (typeof id !== 'number' || !Number.isSafeInteger(id) || id < 1) {
      this.close('protocol error: request without a valid id');
      return;
    }
    let result: Handled;
    try {
      result = this.dispatch(id, m['op'], m);
    } catch (err) {
      this.fail(id, err);
      return;
    }
    if (result === DEFERRED) return;
    if (result instanceof Promise) {
      result.then(
        (r: unknown) => this.reply(id, r),
        (err: unknown) => this.fail(id, err),
      );
    } else {
      this.reply(id, result);
    }
  }

  private reply(id: number, res: unknown): void {
    this.host.flushEvents();
    this.send(encodeFrame({ id, ok: true, res: res ?? null }));
  }

  private fail(id: number, err: unknown): void {
    if (!(err instanceof DyadError)) {
      this.host.log('warn', `KVS request from ${this.peer} failed unexpectedly: ${(err as Error)?.stack ?? String(err)}`);
    }
    this.host.flushEvents();
    this.send(encodeFrame({ id, ok: false, err: toWireError(err) }));
    if (this.endAfterReply && !this.closed) {
      this.host.log('warn', `KVS connection ${this.peer}: too many failed authentication attempts`);
      this.closed = true;
      this.socket.end();
      this.cleanup();
    }
  }

  /** The namespace of a data request, which this connection must be authorised for. */
  private scope(m: Record<string, unknown>): string {
    const ns = m['ns'];
    checkNamespace(ns);
    if (!this.admin && !this.grants.has(ns)) {
      throw accessDenied(`this connection is not authenticated for KVS namespace ${JSON.stringify(ns)}`);
    }
    return ns;
  }

  private requireAdmin(): void {
    if (!this.admin) throw accessDenied('namespace administration needs the admin secret');
  }

  private dispatch(id: number, op: string, m: Record<string, unknown>): Handled {
    const store = this.host.store;
    // Paths, records and rank entries are validated by the store.
    const path = m['path'] as string;
    switch (op) {
      case 'ping':
        return {};
      case 'auth':
        return this.auth(m);
      case 'hasNs': {
        const ns = m['ns'];
        checkNamespace(ns);
        return store.hasNamespace(ns);
      }
      case 'nsCreate': {
        this.requireAdmin();
        const ns = m['ns'];
        checkNamespace(ns);
        return this.host.createNamespace(ns, optString(m['secret'], 'secret')).then(() => null);
      }
      case 'nsRemove': {
        this.requireAdmin();
        const ns = m['ns'];
        checkNamespace(ns);
        return this.host.removeNamespace(ns);
      }
      case 'nsList':
        this.requireAdmin();
        return store.listNamespaces(optString(m['after'], 'after'), NAMESPACE_PAGE);
      case 'nsSecret': {
        this.requireAdmin();
        const ns = m['ns'];
        checkNamespace(ns);
        return store.namespaceSecret(ns);
      }
      case 'publish': {
        const ns = this.scope(m);
        const content = decodeContent(m['bin'], bytesOf(m));
        // The store announces synchronously, inside publish(): that is when the host needs to know who asked.
        return this.host.fromSession(this, () => store.publish(ns, path, m['rec'] as never, content));
      }
      case 'lookup':
        return store.lookup(this.scope(m), path);
      case 'wait':
        return this.wait(id, this.scope(m), path, m['timeoutMs']);
      case 'unpublish':
        return store.unpublish(this.scope(m), path);
      case 'list':
        return store.list(this.scope(m), path, optString(m['after'], 'after'), LIST_PAGE);
      case 'rankSet': {
        const ns = this.scope(m);
        const info = m['info'] as { rank?: unknown } | undefined;
        return store.registerRank(ns, m['info'] as never).then((v) => {
          if (typeof info?.rank === 'number') this.host.rankSeen(ns, info.rank);
          return v;
        });
      }
      case 'rankGet':
        return store.lookupRank(this.scope(m), m['rank'] as number);
      case 'rankList': {
        const ns = this.scope(m);
        const after = m['after'];
        if (after !== undefined && after !== null && typeof after !== 'number') throw invalidArgument('after must be a rank');
        return store.listRanks(ns, after ?? undefined, RANK_PAGE);
      }
      case 'watch': {
        const ns = this.scope(m);
        this.host.subscribe(ns, this);
        this.watched.add(ns);
        return null;
      }
      case 'unwatch': {
        const ns = this.scope(m);
        this.host.unsubscribe(ns, this);
        this.watched.delete(ns);
        return null;
      }
      default:
        throw invalidArgument(`unknown KVS operation ${JSON.stringify(op.slice(0, 100))}`);
    }
  }

  private auth(m: Record<string, unknown>): { mac: string } {
    const rawNs = m['ns'];
    const ns = rawNs === undefined || rawNs === null ? undefined : rawNs;
    if (ns !== undefined) checkNamespace(ns);
    const cnonce = m['cnonce'];
    if (!isNonce(cnonce)) throw invalidArgument('auth needs a client nonce of 64 lowercase hex digits');
    const secret = ns === undefined ? this.host.adminSecret : this.host.store.namespaceSecret(ns);
    const scope = scopeOf(ns);
    if (!proofMatches(authProof(secret, 'client', scope, this.nonce, cnonce), m['mac'])) {
      this.failures++;
      if (this.failures >= MAX_AUTH_FAILURES) this.endAfterReply = true;
      this.host.log('warn', `KVS connection ${this.peer}: authentication for ${scope} failed`);
      throw accessDenied(ns === undefined ? 'wrong admin secret' : `wrong secret for KVS namespace ${JSON.stringify(ns)}`);
    }
    if (ns === undefined) this.admin = true;
    else this.grants.add(ns);
    clearTimeout(this.authTimer);
    return { mac: authProof(secret, 'server', scope, this.nonce, cnonce) };
  }

  /** The deadline runs here, from registration, so a record that exists always beats it. */
  private wait(id: number, ns: string, upath: string, timeoutMs: unknown): Handled {
    if (timeoutMs !== undefined && timeoutMs !== null && (typeof timeoutMs !== 'number' || !(timeoutMs >= 0) || !Number.isFinite(timeoutMs))) {
      throw invalidArgument('timeoutMs must be a non-negative number');
    }
    if (this.waits.has(id)) throw invalidArgument(`request id ${id} is already waiting`);
    if (this.waits.size >= this.host.limits.maxWaits) {
      throw kvsError('DYAD_EAGAIN', 'EAGAIN', `more than ${this.host.limits.maxWaits} waits pending on one connection`);
    }
    const settle = (): void => {
      clearTimeout(this.waits.get(id)?.timer);
      this.waits.delete(id);
    };
    const waiter: Waiter = {
      resolve: (rec) => {
        settle();
        this.reply(id, rec);
      },
      reject: (err) => {
        settle();
        this.fail(id, err);
      },
    };
    const rec = this.host.store.addWaiter(ns, upath, waiter);
    if (rec !== undefined) return rec;
    const timer =
      typeof timeoutMs === 'number'
        ? setTimeout(() => {
            this.host.store.removeWaiter(ns, upath, waiter);
            waiter.reject(timedOut(`KVS wait of ${JSON.stringify(upath)}`, timeoutMs));
          }, timeoutMs)
        : undefined;
    this.waits.set(id, { ns, upath, waiter, timer });
    return DEFERRED;
  }

  private cancel(target: unknown): void {
    if (typeof target !== 'number') return;
    const w = this.waits.get(target);
    if (w === undefined) return;
    clearTimeout(w.timer);
    this.waits.delete(target);
    this.host.store.removeWaiter(w.ns, w.upath, w.waiter);
  }
}
