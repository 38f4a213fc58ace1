/**
 * Kvs over one TCP connection to an embedded KVS server (dyad://host:port).
 *
 * Requests are pipelined with ids. When the connection drops the client
 * reconnects with backoff, re-authenticates, re-subscribes its watches and then
 * resends what was in flight: reads, waits and the state-setting writes (publish,
 * unpublish, registerRank) are safe to repeat, so a server restart is invisible
 * to them apart from latency. Namespace creation and removal are not repeated;
 * they fail with DYAD_ECONNRESET because their outcome is unknown.
 *
 * Authentication is per namespace and lazy: the first request for a namespace on
 * a connection runs the challenge-response of auth.ts. With an admin secret the
 * client authenticates once as admin, which covers every namespace.
 */
import { connect as netConnect, isIPv6, type Socket } from 'node:net';
import { ConfigError, DyadError, errnos } from '../../errors.js';
import { accessDenied, closedError, interrupted, invalidArgument, kvsError, noNamespace, protocolError, timedOut } from '../errors.js';
import type {
  DirEntry,
  FileRecord,
  KvsWatchEvent,
  KvsWatchListener,
  PublishInput,
  PublishOptions,
  RankInfo,
  WaitOptions,
  WatchableKvs,
} from '../types.js';
import { checkUpath } from '../upath.js';
import { checkNamespace, checkPublishInput, checkRank, checkRankInfo } from '../validate.js';
import { authProof, isNonce, newNonce, proofMatches, scopeOf } from './auth.js';
import {
  CLIENT_MAX_FRAME_BYTES,
  BYTES,
  bytesOf,
  decodeContent,
  encodeFrame,
  type Carrying,
  FrameDecoder,
  fromWireError,
  isObject,
  MAX_PUSHED_BYTES,
  PROTOCOL,
  type HelloFrame,
  type WireChange,
} from './protocol.js';
import { SecretSource, type SecretOptions } from './secrets.js';
import { TurnBatcher } from './batch.js';

export interface EmbeddedClientOptions extends SecretOptions {
  /** Deadline for each request other than wait(), including time spent reconnecting; 0 = none. Default 30 s. */
  requestTimeoutMs?: number;
  /** How long connect() keeps trying to reach the server. Default 10 s. */
  connectTimeoutMs?: number;
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
  maxFrameBytes?: number;
  /** Where DYAD_SECRET and friends are read from (default process.env). */
  env?: NodeJS.ProcessEnv;
}

const HELLO_TIMEOUT_MS = 10_000;
/** How long past its deadline a sent wait may take to bring the server's own verdict. */
const WAIT_GRACE_MS = 2_000;

type Scope = { kind: 'none' } | { kind: 'admin' } | { kind: 'ns'; ns: string };

interface Pending {
  id: number;
  msg: Record<string, unknown>;
  scope: Scope;
  /** Resend on a new connection if the one it was sent on drops. */
  retry: boolean;
  /** A wait: tell the server to drop it when we give up. */
  isWait: boolean;
  /** performance.now() deadline of a wait with a timeout; the server enforces it, given the remainder. */
  deadline: number | undefined;
  /** For messages: what the request was and its timeout. */
  what: string;
  timeoutMs: number | undefined;
  conn: Conn | undefined;
  done: boolean;
  resolve(v: unknown): void;
  reject(e: DyadError): void;
  cleanup(): void;
}

/** Marks failures that only mean "this connection is gone". */
class ConnectionLost extends DyadError {
  constructor(message: string) {
    super('DYAD_ECONNRESET', errnos.ECONNRESET, message);
  }
}

class Conn {
  hello: HelloFrame | undefined;
  alive = true;
  ready = false;
  admin = false;
  readonly grants = new Set<string>();
  readonly authing = new Map<string, Promise<void>>();
  readonly watching = new Map<string, Promise<void>>();
  readonly watched = new Set<string>();
  readonly internal = new Map<number, { resolve(v: unknown): void; reject(e: DyadError): void }>();
  readonly decoder: FrameDecoder;
  private readonly out: TurnBatcher;
  onHello: (() => void) | undefined;

  constructor(
    readonly socket: Socket,
    maxFrameBytes: number,
  ) {
    this.decoder = new FrameDecoder(maxFrameBytes);
    this.out = new TurnBatcher(socket);
  }

  send(msg: object): void {
    const bytes = (msg as Carrying)[BYTES];
    if (this.alive) this.out.write(encodeFrame(msg, bytes === undefined ? undefined : [bytes]));
  }
}

/**
 * host and port of a dyad://HOST:PORT URL; `label` names the URL in
 * messages (a caller may say which flag or variable gave it).
 */
export function parseDyadUrl(url: string, label = `KVS URL ${JSON.stringify(url)}`): { host: string; port: number } {
  const bad = (why: string) => new ConfigError(`${label}: ${why} (expected dyad://HOST:PORT)`);
  const m = /^dyad:\/\/([^/?#]*)(.*)$/i.exec(url);
  if (m === null) throw bad('not a dyad:// URL');
  const authority = m[1]!;
  if (m[2] !== '' && m[2] !== '/') throw bad(`unexpected ${JSON.stringify(m[2])} after the port`);
  if (authority.includes('@')) throw bad('user names are not supported');
  const hp = /^(\[[^\]]*\]|[^:]*)(?::(.*))?$/.exec(authority)!;
  const bracketed = /^\[.*\]$/.test(hp[1]!);
  const host = bracketed ? hp[1]!.slice(1, -1) : hp[1]!;
  if (host === '') throw bad('missing host');
  if (bracketed ? !isIPv6(host) : !/^[A-Za-z0-9._-]+$/.test(host)) throw bad(`${JSON.stringify(hp[1])} is not a host name or address`);
  if (hp[2] === undefined || hp[2] === '') throw bad('missing port');
  if (!/^\d+$/.test(hp[2])) throw bad(`port ${JSON.stringify(hp[2])} is not a number`);
  const port = Number(hp[2]);
  if (port < 1 || port > 65535) throw bad(`port ${hp[2]} is out of range (1-65535)`);
  return { host, port };
}

function asPage<T>(res: unknown): { items: T[]; more: boolean } {
  if (!isObject(res) || !Array.isArray(res['items'])) throw protocolError('malformed page in KVS reply');
  return { items: res['items'] as T[], more: res['more'] === true };
}

export class EmbeddedKvsClient implements WatchableKvs {
  readonly url: string;
  private readonly secrets: SecretSource;
  private readonly requestTimeoutMs: number;
  private readonly reconnectMinMs: number;
  private readonly reconnectMaxMs: number;
  private readonly maxFrameBytes: number;
  private nextId = 1;
  private conn: Conn | undefined;
  private connecting: Promise<Conn> | undefined;
  private readonly pending = new Map<number, Pending>();
  private readonly watches = new Map<string, Set<KvsWatchListener>>();
  private closed = false;
  private wantConnection = false;
  private lastError: Error | undefined;
  private sleeping: { timer: NodeJS.Timeout; wake(): void } | undefined;

  private constructor(
    readonly host: string,
    readonly port: number,
    opts: EmbeddedClientOptions,
  ) {
    this.url = `dyad://${host.includes(':') ? `[${host}]` : host}:${port}`;
    this.secrets = new SecretSource(opts, opts.env ?? process.env);
    this.requestTimeoutMs = opts.requestTimeoutMs ?? 30_000;
    this.reconnectMinMs = opts.reconnectMinMs ?? 50;
    this.reconnectMaxMs = opts.reconnectMaxMs ?? 2_000;
    this.maxFrameBytes = opts.maxFrameBytes ?? CLIENT_MAX_FRAME_BYTES;
  }

  /** Connects (retrying for connectTimeoutMs) and returns the client; DYAD_ECONNREFUSED if the server stays unreachable. */
  static async connect(url: string, opts: EmbeddedClientOptions = {}): Promise<EmbeddedKvsClient> {
    const { host, port } = parseDyadUrl(url);
    const client = new EmbeddedKvsClient(host, port, opts);
    const limit = opts.connectTimeoutMs ?? 10_000;
    client.wantConnection = true;
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        client.connection(),
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error('timeout')), limit);
        }),
      ]);
    } catch {
      const last = client.lastError?.message ?? 'no answer';
      await client.close();
      throw kvsError('DYAD_ECONNREFUSED', 'ECONNREFUSED', `cannot reach the KVS server at ${client.url} within ${limit} ms: ${last}`);
    } finally {
      clearTimeout(timer);
      client.wantConnection = false;
    }
    return client;
  }

  // ---- Kvs ----

  async publish(ns: string, upath: string, rec: PublishInput, opts?: PublishOptions): Promise<FileRecord> {
    checkNamespace(ns);
    checkUpath(upath);
    const clean = checkPublishInput(rec);
    const msg: Record<string, unknown> & Carrying = { op: 'publish', ns, path: upath, rec: clean };
    const c = opts?.content;
    if (c !== undefined && c.byteLength <= MAX_PUSHED_BYTES) {
      msg['bin'] = [0, c.byteLength];
      msg[BYTES] = Buffer.from(c.buffer, c.byteOffset, c.byteLength);
    }
    return (await this.request(ns, msg, true)) as FileRecord;
  }

  async lookup(ns: string, upath: string): Promise<FileRecord | undefined> {
    checkNamespace(ns);
    checkUpath(upath, true);
    const res = await this.request(ns, { op: 'lookup', ns, path: upath }, true);
    return (res ?? undefined) as FileRecord | undefined;
  }

  async wait(ns: string, upath: string, opts: WaitOptions = {}): Promise<FileRecord> {
    checkNamespace(ns);
    checkUpath(upath, true);
    return (await this.request(ns, { op: 'wait', ns, path: upath }, true, opts)) as FileRecord;
  }

  async unpublish(ns: string, upath: string): Promise<boolean> {
    checkNamespace(ns);
    checkUpath(upath);
    return (await this.request(ns, { op: 'unpublish', ns, path: upath }, true)) === true;
  }

  async list(ns: string, dirUpath: string): Promise<DirEntry[]> {
    checkNamespace(ns);
    checkUpath(dirUpath, true);
    const out: DirEntry[] = [];
    let after: string | undefined;
    for (;;) {
      const page = asPage<DirEntry>(await this.request(ns, { op: 'list', ns, path: dirUpath, after }, true));
      out.push(...page.items);
      if (!page.more || page.items.length === 0) return out;
      after = page.items[page.items.length - 1]!.name;
    }
  }

  /** With a configured namespace secret (option or DYAD_SECRET) the namespace is created with that secret. */
  async createNamespace(ns: string, opts: { secret?: string } = {}): Promise<void> {
    checkNamespace(ns);
    const secret = opts.secret ?? this.secrets.explicitSecret;
    await this.adminRequest({ op: 'nsCreate', ns, secret }, false);
  }

  async removeNamespace(ns: string): Promise<void> {
    checkNamespace(ns);
    await this.adminRequest({ op: 'nsRemove', ns }, false);
  }

  async listNamespaces(): Promise<string[]> {
    const out: string[] = [];
    let after: string | undefined;
    for (;;) {
      const page = asPage<string>(await this.adminRequest({ op: 'nsList', after }, true));
      out.push(...page.items);
      if (!page.more || page.items.length === 0) return out;
      after = page.items[page.items.length - 1];
    }
  }

  async hasNamespace(ns: string): Promise<boolean> {
    checkNamespace(ns);
    return (await this.send({ kind: 'none' }, { op: 'hasNs', ns }, true)) === true;
  }

  /** A namespace's secret, for handing to clients that cannot read the server's secret files (admin only). */
  async namespaceSecret(ns: string): Promise<string> {
    checkNamespace(ns);
    const res = await this.adminRequest({ op: 'nsSecret', ns }, true);
    if (typeof res !== 'string') throw protocolError('malformed secret in KVS reply');
    return res;
  }

  async registerRank(ns: string, info: RankInfo): Promise<void> {
    checkNamespace(ns);
    await this.request(ns, { op: 'rankSet', ns, info: checkRankInfo(info) }, true);
  }

  async lookupRank(ns: string, rank: number): Promise<RankInfo | undefined> {
    checkNamespace(ns);
    checkRank(rank);
    return ((await this.request(ns, { op: 'rankGet', ns, rank }, true)) ?? undefined) as RankInfo | undefined;
  }

  async listRanks(ns: string): Promise<RankInfo[]> {
    checkNamespace(ns);
    const out: RankInfo[] = [];
    let after: number | undefined;
    for (;;) {
      const page = asPage<RankInfo>(await this.request(ns, { op: 'rankList', ns, after }, true));
      out.push(...page.items);
      if (!page.more || page.items.length === 0) return out;
      after = page.items[page.items.length - 1]!.rank;
    }
  }

  async watch(ns: string, listener: KvsWatchListener): Promise<() => void> {
    checkNamespace(ns);
    if (this.closed) throw closedError('KVS client');
    let set = this.watches.get(ns);
    if (set === undefined) this.watches.set(ns, (set = new Set()));
    set.add(listener);
    const unsubscribe = (): void => this.unwatch(ns, listener);
    try {
      for (;;) {
        const conn = await this.connection();
        try {
          await this.subscribe(conn, ns);
          if (conn.alive) break;
        } catch (err) {
          if (!(err instanceof ConnectionLost)) throw err;
        }
      }
    } catch (err) {
      unsubscribe();
      throw err;
    }
    return unsubscribe;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const err = closedError('KVS client');
    for (const p of [...this.pending.values()]) this.settle(p, err);
    const watches = [...this.watches];
    this.watches.clear();
    for (const [ns, set] of watches) emit(set, { type: 'closed', ns, reason: err });
    this.sleeping?.wake();
    const conn = this.conn;
    this.conn = undefined;
    if (conn !== undefined) {
      await new Promise<void>((resolve) => {
        conn.socket.once('close', () => resolve());
        conn.socket.destroy();
      });
    }
  }

  // ---- requests ----

  private request(ns: string, msg: Record<string, unknown>, retry: boolean, wait?: WaitOptions): Promise<unknown> {
    return this.send({ kind: 'ns', ns }, msg, retry, wait);
  }

  private adminRequest(msg: Record<string, unknown>, retry: boolean): Promise<unknown> {
    return this.send({ kind: 'admin' }, msg, retry);
  }

  private send(scope: Scope, msg: Record<string, unknown>, retry: boolean, wait?: WaitOptions): Promise<unknown> {
    if (this.closed) return Promise.reject(closedError('KVS client'));
    const isWait = wait !== undefined;
    const what = `KVS ${String(msg['op'])}${typeof msg['path'] === 'string' ? ` of ${JSON.stringify(msg['path'])}` : ''}`;
    const timeoutMs = isWait ? wait.timeoutMs : this.requestTimeoutMs > 0 ? this.requestTimeoutMs : undefined;
    if (timeoutMs !== undefined && (!Number.isFinite(timeoutMs) || timeoutMs < 0)) {
      return Promise.reject(invalidArgument(`timeoutMs must be a non-negative number, got ${timeoutMs}`));
    }
    const signal = wait?.signal;
    if (signal?.aborted === true) return Promise.reject(interrupted(what));
    return new Promise<unknown>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const onAbort = (): void => this.giveUp(p, interrupted(what));
      const p: Pending = {
        id: this.nextId++,
        msg,
        scope,
        retry,
        isWait,
        deadline: isWait && timeoutMs !== undefined ? performance.now() + timeoutMs : undefined,
        what,
        timeoutMs,
        conn: undefined,
        done: false,
        resolve,
        reject,
        cleanup: () => {
          clearTimeout(timer);
          signal?.removeEventListener('abort', onAbort);
        },
      };
      this.pending.set(p.id, p);
      if (timeoutMs !== undefined) {
        timer = setTimeout(() => {
          const err = timedOut(what, timeoutMs);
          if (isWait && p.conn?.alive === true) {
            // The server times the wait itself; a record it already has must still win.
            timer = setTimeout(() => this.giveUp(p, err), WAIT_GRACE_MS);
            return;
          }
          if (this.lastError !== undefined && p.conn === undefined) err.message += ` (last connection error: ${this.lastError.message})`;
          this.giveUp(p, err);
        }, timeoutMs);
      }
      signal?.addEventListener('abort', onAbort, { once: true });
      void this.dispatch(p);
    });
  }

  private settle(p: Pending, err: DyadError | undefined, value?: unknown): void {
    if (p.done) return;
    p.done = true;
    p.cleanup();
    this.pending.delete(p.id);
    if (err === undefined) p.resolve(value);
    else p.reject(err);
  }

  /** Timeout or abort: settle, and release the server-side waiter. */
  private giveUp(p: Pending, err: DyadError): void {
    if (p.done) return;
    const conn = p.conn;
    this.settle(p, err);
    if (p.isWait && conn?.alive === true) conn.send({ op: 'cancel', target: p.id });
  }

  private async dispatch(p: Pending): Promise<void> {
    for (;;) {
      if (p.done) return;
      let conn: Conn;
      try {
        conn = await this.connection();
      } catch (err) {
        this.settle(p, err instanceof DyadError ? err : closedError('KVS client'));
        return;
      }
      if (p.done) return;
      try {
        await this.authorize(conn, p.scope);
      } catch (err) {
        if (err instanceof ConnectionLost) continue;
        this.settle(p, err instanceof DyadError ? err : accessDenied(String(err)));
        return;
      }
      if (p.done) return;
      if (!conn.alive) continue;
      p.conn = conn;
      const timeoutMs = p.deadline === undefined ? undefined : Math.max(0, Math.ceil(p.deadline - performance.now()));
      conn.send({ ...p.msg, id: p.id, timeoutMs });
      return;
    }
  }

  /** A request that belongs to the connection (auth, watch): fails with ConnectionLost if it drops. */
  private call(conn: Conn, msg: Record<string, unknown>): Promise<unknown> {
    if (!conn.alive) return Promise.reject(new ConnectionLost('connection lost'));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer =
        this.requestTimeoutMs > 0
          ? setTimeout(() => {
              // An unresponsive server: start over on a fresh connection.
              conn.socket.destroy(new Error(`no reply to ${String(msg['op'])} within ${this.requestTimeoutMs} ms`));
            }, this.requestTimeoutMs)
          : undefined;
      conn.internal.set(id, {
        resolve: (v) => {
          clearTimeout(timer);
          resolve(v);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      conn.send({ ...msg, id });
    });
  }

  // ---- authentication and subscriptions ----

  private authorize(conn: Conn, scope: Scope): Promise<void> {
    if (scope.kind === 'none' || conn.admin) return Promise.resolve();
    if (scope.kind === 'ns' && conn.grants.has(scope.ns)) return Promise.resolve();
    const ns = scope.kind === 'admin' || this.secrets.hasAdmin() ? undefined : scope.ns;
    const key = scopeOf(ns);
    let p = conn.authing.get(key);
    if (p === undefined) {
      p = this.authenticate(conn, ns).finally(() => conn.authing.delete(key));
      conn.authing.set(key, p);
    }
    return p;
  }

  private async authenticate(conn: Conn, ns: string | undefined): Promise<void> {
    let secret: string | undefined;
    try {
      secret = ns === undefined ? await this.secrets.adminSecret() : await this.secrets.namespaceSecret(ns);
    } catch (err) {
      // A secret file missing because the namespace is missing should say so.
      if (ns !== undefined && (await this.call(conn, { op: 'hasNs', ns })) === false) throw noNamespace(ns);
      throw err;
    }
    if (secret === undefined) {
      if (ns !== undefined && (await this.call(conn, { op: 'hasNs', ns })) === false) throw noNamespace(ns);
      throw ns === undefined
        ? accessDenied('namespace administration needs the admin secret: set DYAD_ADMIN_SECRET_FILE or DYAD_ADMIN_SECRET, or pass adminSecret or adminSecretFile')
        : new ConfigError(
            `no secret for KVS namespace ${JSON.stringify(ns)}: set DYAD_SECRET_FILE or DYAD_SECRET, or pass secret, secretFile or secretDir`,
            errnos.EACCES,
          );
    }
    const scope = scopeOf(ns);
    const serverNonce = conn.hello!.nonce;
    const cnonce = newNonce();
    const res = await this.call(conn, { op: 'auth', ns, cnonce, mac: authProof(secret, 'client', scope, serverNonce, cnonce) });
    if (!isObject(res) || !proofMatches(authProof(secret, 'server', scope, serverNonce, cnonce), res['mac'])) {
      conn.socket.destroy();
      throw accessDenied(`the KVS server at ${this.url} could not prove it holds the secret for ${scope}`);
    }
    if (ns === undefined) conn.admin = true;
    else conn.grants.add(ns);
  }

  private subscribe(conn: Conn, ns: string): Promise<void> {
    if (conn.watched.has(ns)) return Promise.resolve();
    let p = conn.watching.get(ns);
    if (p === undefined) {
      p = (async () => {
        await this.authorize(conn, { kind: 'ns', ns });
        await this.call(conn, { op: 'watch', ns });
        conn.watched.add(ns);
      })().finally(() => conn.watching.delete(ns));
      conn.watching.set(ns, p);
    }
    return p;
  }

  private unwatch(ns: string, listener: KvsWatchListener): void {
    const set = this.watches.get(ns);
    if (set === undefined || !set.delete(listener) || set.size > 0) return;
    this.watches.delete(ns);
    const conn = this.conn;
    if (conn?.watched.delete(ns) === true) this.call(conn, { op: 'unwatch', ns }).catch(() => undefined);
  }

  // ---- connection management ----

  private hasDemand(): boolean {
    return this.wantConnection || this.pending.size > 0 || this.watches.size > 0;
  }

  private connection(): Promise<Conn> {
    if (this.closed) return Promise.reject(closedError('KVS client'));
    if (this.conn !== undefined && this.conn.alive && this.conn.ready) return Promise.resolve(this.conn);
    this.connecting ??= this.connectLoop().finally(() => {
      this.connecting = undefined;
    });
    return this.connecting;
  }

  private async connectLoop(): Promise<Conn> {
    let delay = this.reconnectMinMs;
    for (;;) {
      if (this.closed) throw closedError('KVS client');
      try {
        const conn = await this.open();
        await this.restoreWatches(conn);
        if (!conn.alive) throw new ConnectionLost('connection lost during setup');
        if (this.closed) {
          conn.socket.destroy();
          throw closedError('KVS client');
        }
        conn.ready = true;
        this.conn = conn;
        this.lastError = undefined;
        return conn;
      } catch (err) {
        if (this.closed) throw closedError('KVS client');
        this.lastError = err as Error;
      }
      if (!this.hasDemand()) throw kvsError('DYAD_ECONNRESET', 'ECONNRESET', `KVS server at ${this.url}: ${this.lastError?.message}`);
      // Jitter spreads the reconnects of many clients after a server restart.
      await this.sleep(delay * (0.5 + Math.random() / 2));
      delay = Math.min(this.reconnectMaxMs, delay * 2);
    }
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const wake = (): void => {
        clearTimeout(timer);
        this.sleeping = undefined;
        resolve();
      };
      const timer = setTimeout(wake, ms);
      this.sleeping = { timer, wake };
    });
  }

  /** TCP connect and the server's hello. */
  private open(): Promise<Conn> {
    return new Promise((resolve, reject) => {
      const socket = netConnect({ host: this.host, port: this.port });
      socket.setNoDelay(true);
      socket.setKeepAlive(true, 15_000);
      const conn = new Conn(socket, this.maxFrameBytes);
      const timer = setTimeout(() => socket.destroy(new Error(`no hello within ${HELLO_TIMEOUT_MS} ms`)), HELLO_TIMEOUT_MS);
      let failure: Error | undefined;
      conn.onHello = () => {
        clearTimeout(timer);
        conn.onHello = undefined;
        resolve(conn);
      };
      socket.on('data', (chunk: Buffer) => this.onData(conn, chunk));
      socket.on('error', (err) => {
        failure = err;
      });
      socket.on('close', () => {
        clearTimeout(timer);
        if (conn.onHello !== undefined) {
          conn.onHello = undefined;
          conn.alive = false;
          reject(failure ?? new Error('connection closed before the server said hello'));
          return;
        }
        this.onClose(conn, failure);
      });
    });
  }

  /** Re-subscribes watches on a new connection before any request is sent on it. */
  private async restoreWatches(conn: Conn): Promise<void> {
    for (const ns of [...this.watches.keys()]) {
      try {
        await this.subscribe(conn, ns);
      } catch (err) {
        if (err instanceof ConnectionLost || !conn.alive) throw err;
        const set = this.watches.get(ns);
        this.watches.delete(ns);
        if (set !== undefined) emit(set, { type: 'closed', ns, reason: err as Error });
      }
    }
  }

  private onClose(conn: Conn, failure: Error | undefined): void {
    conn.alive = false;
    if (failure !== undefined) this.lastError = failure;
    const lost = new ConnectionLost(`connection to the KVS server at ${this.url} lost${failure ? `: ${failure.message}` : ''}`);
    const internal = [...conn.internal.values()];
    conn.internal.clear();
    for (const c of internal) c.reject(lost);
    if (this.conn === conn) this.conn = undefined;
    if (this.closed) return;
    if (conn.ready) {
      for (const ns of conn.watched) {
        const set = this.watches.get(ns);
        if (set !== undefined) emit(set, { type: 'reset', ns });
      }
    }
    for (const p of [...this.pending.values()]) {
      if (p.conn !== conn) continue;
      p.conn = undefined;
      if (p.retry) void this.dispatch(p);
      else this.settle(p, kvsError('DYAD_ECONNRESET', 'ECONNRESET', `${lost.message}; the outcome of ${String(p.msg['op'])} is unknown`));
    }
    // Keep watches alive even when nothing else is pending.
    if (this.watches.size > 0) this.connection().catch(() => undefined);
  }

  private onData(conn: Conn, chunk: Buffer): void {
    let msgs: unknown[];
    try {
      msgs = conn.decoder.push(chunk);
    } catch (err) {
      conn.socket.destroy(err as Error);
      return;
    }
    for (const m of msgs) {
      if (!conn.alive) return;
      try {
        this.onMessage(conn, m);
      } catch (err) {
        conn.socket.destroy(err as Error);
        return;
      }
    }
  }

  private onMessage(conn: Conn, m: unknown): void {
    if (!isObject(m)) throw protocolError('KVS server sent a frame that is not an object');
    if (conn.hello === undefined) {
      if (m['hello'] !== PROTOCOL || !isNonce(m['nonce'])) {
        throw protocolError(`KVS server does not speak ${PROTOCOL} (hello: ${JSON.stringify(m).slice(0, 100)})`);
      }
      conn.hello = m as unknown as HelloFrame;
      conn.onHello?.();
      return;
    }
    const id = m['id'];
    if (typeof id === 'number') {
      const err = m['ok'] === true ? undefined : fromWireError(m['err']);
      const internal = conn.internal.get(id);
      if (internal !== undefined) {
        conn.internal.delete(id);
        if (err === undefined) internal.resolve(m['res']);
        else internal.reject(err);
        return;
      }
      const p = this.pending.get(id);
      if (p === undefined || p.conn !== conn) return;
      // The server timed a resent wait from its remainder; report the caller's timeout.
      const shown = err?.code === 'DYAD_ETIMEDOUT' && p.timeoutMs !== undefined ? timedOut(p.what, p.timeoutMs) : err;
      this.settle(p, shown, m['res']);
      return;
    }
    const ev = m['ev'];
    const ns = m['ns'];
    if (typeof ev !== 'string' || typeof ns !== 'string') throw protocolError('KVS server sent an unknown frame');
    const set = this.watches.get(ns);
    if (set === undefined || !conn.watched.has(ns)) return;
    if (ev === 'change') {
      const bytes = bytesOf(m);
      const changes = (Array.isArray(m['changes']) ? (m['changes'] as WireChange[]) : []).map((c) => {
        const content = decodeContent(c.bin, bytes);
        return content === undefined ? { upath: c.path, record: c.rec ?? undefined } : { upath: c.path, record: c.rec ?? undefined, content };
      });
      emit(set, { type: 'change', ns, rev: Number(m['rev']), changes });
    } else if (ev === 'closed') {
      conn.watched.delete(ns);
      this.watches.delete(ns);
      emit(set, { type: 'closed', ns, reason: fromWireError(m['err']) });
    }
  }
}

function emit(listeners: Set<KvsWatchListener>, event: KvsWatchEvent): void {
  for (const l of [...listeners]) {
    try {
      l(event);
    } catch (err) {
      process.emitWarning(`dyad KVS watch listener threw: ${err instanceof Error ? err.message : String(err)}`);
    }
  }
}

