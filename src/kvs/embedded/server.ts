/**
 * The embedded KVS server: a TCP listener that serves a KvsStore to clients
 * (dyad://host:port), persisting to a data directory when given one.
 *
 * It owns what is not per-connection: the store and its journal, the admin
 * secret, the export of namespace secret files, and one store subscription per
 * watched namespace whose events are encoded once and written to every
 * subscribed connection.
 */
import { readFile } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { debuglog } from 'node:util';
import { ConfigError, errnoOf } from '../../errors.js';
import { keyParamsFromEnv, checkKeyParams } from '../key.js';
import type { KvsWatchEvent, RankInfo, WatchableKvs } from '../types.js';
import { MemoryKvs } from '../memory.js';
import { openPersistentStore, type PersistentStore } from './persist.js';
import { encodeFrame, SERVER_MAX_FRAME_BYTES, toWireError, type EventFrame } from './protocol.js';
import { generateSecret, parseSecret, removeSecretFile, secretPath, writeSecretFile } from './secrets.js';
import { DEFAULT_HOLD_MS, Fanout } from './fanout.js';
import { Session, type SessionHost, type SessionLimits } from './session.js';
import { KvsStore } from './store.js';

export interface KvsServerOptions {
  /** Persist here (journal, admin secret); without it the server forgets everything on close. */
  dataDir?: string;
  /** Where namespace secrets are exported as <ns>.secret; default <dataDir>/secrets, none without a dataDir. */
  secretDir?: string;
  /** Admin secret (64 hex digits). Default: <dataDir>/admin.secret, or a fresh one without a dataDir. */
  adminSecret?: string;
  /** fdatasync the journal before acknowledging changes (default true). */
  fsync?: boolean;
  /** DYAD key parameters; default DYAD_KEY_DEPTH / DYAD_KEY_BINS, then 3 / 1024. */
  keyDepth?: number;
  keyBins?: number;
  limits?: Partial<SessionLimits>;
  /**
   * A rank not re-registered for this long is dropped, so readers stop
   * trying a dead node (daemons renew every third of it). Default 10 s.
   */
  rankLeaseMs?: number;
  /**
   * Change events that follow a send to watchers within this long are held
   * and sent together (fanout.ts). Default 5 ms; 0 sends each at once.
   */
  eventHoldMs?: number;
  log?: (level: 'info' | 'warn', msg: string) => void;
  env?: NodeJS.ProcessEnv;
}

const debug = debuglog('dyad-kvs');

export const DEFAULT_SESSION_LIMITS: SessionLimits = {
  maxFrameBytes: SERVER_MAX_FRAME_BYTES,
  authTimeoutMs: 10_000,
  maxWaits: 1_000_000,
  maxBacklogBytes: 64 << 20,
};

export class KvsServer implements SessionHost {
  readonly limits: SessionLimits;
  private readonly sessions = new Set<Session>();
  private readonly hubs = new Map<string, { fanout: Fanout; stop: () => void }>();
  /** The session whose request is being applied, while the store announces its change. */
  private origin: Session | undefined;
  private server: Server | undefined;
  private bound: { host: string; port: number } | undefined;
  private closing: Promise<void> | undefined;

  private constructor(
    readonly store: KvsStore,
    readonly adminSecret: string,
    readonly secretDir: string | undefined,
    private readonly persistent: PersistentStore | undefined,
    limits: SessionLimits,
    private readonly logFn: (level: 'info' | 'warn', msg: string) => void,
    private readonly holdMs: number,
  ) {
    this.limits = limits;
    store.onNamespaceRemoved((ns) => {
      for (const s of this.sessions) s.revoke(ns);
    });
  }

  static async open(opts: KvsServerOptions = {}): Promise<KvsServer> {
    const env = opts.env ?? process.env;
    const fromEnv = opts.keyDepth === undefined || opts.keyBins === undefined ? keyParamsFromEnv(env) : undefined;
    const keyDepth = opts.keyDepth ?? fromEnv!.depth;
    const keyBins = opts.keyBins ?? fromEnv!.bins;
    checkKeyParams(keyDepth, keyBins);
    const holdMs = opts.eventHoldMs ?? DEFAULT_HOLD_MS;
    if (!Number.isFinite(holdMs) || holdMs < 0) throw new ConfigError(`eventHoldMs must be a non-negative number of milliseconds, got ${holdMs}`);
    const log = opts.log ?? ((level, msg) => debug('%s: %s', level, msg));
    const limits = { ...DEFAULT_SESSION_LIMITS, ...opts.limits };
    let persistent: PersistentStore | undefined;
    let store: KvsStore;
    let adminSecret: string;
    if (opts.dataDir !== undefined) {
      persistent = await openPersistentStore({
        dataDir: opts.dataDir,
        fsync: opts.fsync,
        keyDepth,
        keyBins,
        log: (msg) => log('warn', msg),
      });
      store = persistent.store;
      adminSecret = opts.adminSecret === undefined ? persistent.adminSecret : parseSecret(opts.adminSecret, 'the adminSecret option');
    } else {
      store = new KvsStore({ keyDepth, keyBins });
      adminSecret = parseSecret(opts.adminSecret ?? generateSecret(), 'the adminSecret option');
    }
    const secretDir = opts.secretDir ?? (opts.dataDir === undefined ? undefined : join(opts.dataDir, 'secrets'));
    const server = new KvsServer(store, adminSecret, secretDir, persistent, limits, log, holdMs);
    await server.exportSecrets();
    server.startLeases(opts.rankLeaseMs ?? 10_000);
    return server;
  }

  private readonly lastSeen = new Map<string, { ns: string; rank: number; at: number }>();
  private leaseTimer: NodeJS.Timeout | undefined;

  /** How long change events that follow a send are held (fanout.ts). */
  get eventHoldMs(): number {
    return this.holdMs;
  }

  /**
   * A Kvs for code running in this process (the daemon that serves the
   * KVS): the store itself, with no socket and no serialisation in between.
   */
  localClient(): WatchableKvs {
    const server = this;
    return new (class extends MemoryKvs {
      override async registerRank(ns: string, info: RankInfo): Promise<void> {
        await super.registerRank(ns, info);
        server.rankSeen(ns, info.rank);
      }
    })(this.store);
  }

  rankSeen(ns: string, rank: number): void {
    this.lastSeen.set(`${ns}\0${rank}`, { ns, rank, at: Date.now() });
  }

  /** Ranks loaded from the journal get one lease to come back and renew. */
  private startLeases(leaseMs: number): void {
    for (const { ns, rank } of this.store.allRanks()) this.rankSeen(ns, rank);
    this.leaseTimer = setInterval(() => {
      const now = Date.now();
      for (const [k, v] of this.lastSeen) {
        if (now - v.at < leaseMs) continue;
        this.lastSeen.delete(k);
        if (this.store.dropRank(v.ns, v.rank)) {
          this.logFn('info', `rank ${v.rank} of namespace ${v.ns} expired: not renewed for ${Math.round((now - v.at) / 1000)} s`);
        }
      }
    }, Math.min(1000, leaseMs / 2));
    this.leaseTimer.unref();
  }

  /** Starts accepting connections; port 0 picks a free port. Resolves with the bound address. */
  listen(host = '127.0.0.1', port = 0): Promise<{ host: string; port: number }> {
    if (this.server !== undefined) return Promise.reject(new ConfigError('KVS server is already listening'));
    const server = createServer((socket) => this.accept(socket));
    this.server = server;
    return new Promise((resolve, reject) => {
      const onListenError = (err: Error): void => {
        this.server = undefined;
        reject(new ConfigError(`KVS server cannot listen on ${host}:${port}: ${err.message}`, errnoOf(err)));
      };
      server.once('error', onListenError);
      server.listen(port, host, () => {
        server.off('error', onListenError);
        const addr = server.address();
        const bound = { host, port: typeof addr === 'object' && addr !== null ? addr.port : port };
        this.bound = bound;
        server.on('error', (err) => this.log('warn', `KVS listener: ${err.message}`));
        resolve(bound);
      });
    });
  }

  get address(): { host: string; port: number } | undefined {
    return this.bound;
  }

  /** dyad://host:port, for openKvs(). */
  get url(): string {
    if (this.bound === undefined) throw new ConfigError('KVS server is not listening');
    const host = this.bound.host.includes(':') ? `[${this.bound.host}]` : this.bound.host;
    return `dyad://${host}:${this.bound.port}`;
  }

  /** Creates a namespace (optionally with a chosen secret) and exports its secret file; returns the secret. */
  async createNamespace(ns: string, secret?: string): Promise<string> {
    const s = await this.store.createNamespace(ns, secret);
    await this.exportSecret(ns, s);
    return s;
  }

  async removeNamespace(ns: string): Promise<void> {
    await this.store.removeNamespace(ns);
    if (this.secretDir !== undefined) {
      await removeSecretFile(secretPath(this.secretDir, ns)).catch((err: Error) =>
        this.log('warn', `cannot remove secret file of namespace ${ns}: ${err.message}`),
      );
    }
  }

  /** The file a client may read namespace ns's secret from, when secrets are exported. */
  secretFileOf(ns: string): string | undefined {
    return this.secretDir === undefined ? undefined : secretPath(this.secretDir, ns);
  }

  subscribe(ns: string, session: Session): void {
    let hub = this.hubs.get(ns);
    if (hub === undefined) {
      const fanout = new Fanout(ns, this.holdMs);
      const unwatch = this.store.watch(ns, (ev) => this.fanOut(ns, ev));
      hub = {
        fanout,
        stop: () => {
          fanout.stop();
          unwatch();
        },
      };
      this.hubs.set(ns, hub);
    }
    hub.fanout.watchers.add(session);
  }

  unsubscribe(ns: string, session: Session): void {
    const hub = this.hubs.get(ns);
    if (hub === undefined) return;
    hub.fanout.watchers.delete(session);
    if (hub.fanout.watchers.size === 0) {
      hub.stop();
      this.hubs.delete(ns);
    }
  }

  detach(session: Session): void {
    this.sessions.delete(session);
  }

  log(level: 'info' | 'warn', msg: string): void {
    this.logFn(level, msg);
  }

  get connectionCount(): number {
    return this.sessions.size;
  }

  /** Stops listening, drops every connection (clients reconnect elsewhere or later) and flushes the journal. */
  close(): Promise<void> {
    if (this.leaseTimer) clearInterval(this.leaseTimer);
    this.closing ??= (async () => {
      const server = this.server;
      const stopped = server === undefined ? Promise.resolve() : new Promise<void>((resolve) => server.close(() => resolve()));
      for (const s of [...this.sessions]) s.close('server shutting down');
      for (const hub of this.hubs.values()) hub.stop();
      this.hubs.clear();
      await stopped;
      await this.persistent?.close();
    })();
    return this.closing;
  }

  private accept(socket: Socket): void {
    if (this.closing !== undefined) {
      socket.destroy();
      return;
    }
    const session = new Session(this, socket);
    this.sessions.add(session);
  }

  /** Runs a session's mutation; its change events then skip pushed bytes for that session, which sent them. */
  fromSession<T>(session: Session, fn: () => T): T {
    this.origin = session;
    try {
      return fn();
    } finally {
      this.origin = undefined;
    }
  }

  /** Sends the change events held back (fanout.ts): a reply is about to leave, and must follow them. */
  flushEvents(): void {
    for (const hub of this.hubs.values()) if (hub.fanout.pending) hub.fanout.flush();
  }

  private fanOut(ns: string, ev: KvsWatchEvent): void {
    const hub = this.hubs.get(ns);
    if (hub === undefined) return;
    if (ev.type === 'closed') {
      this.hubs.delete(ns);
      hub.fanout.flush();
      hub.fanout.stop();
      const buf = encodeFrame({ ev: 'closed', ns, err: toWireError(ev.reason) } satisfies EventFrame);
      for (const s of hub.fanout.watchers) s.send(buf);
      return;
    }
    if (ev.type !== 'change') return;
    hub.fanout.change(ev.rev, ev.changes, this.origin);
  }

  private async exportSecret(ns: string, secret: string): Promise<void> {
    if (this.secretDir === undefined) return;
    const file = secretPath(this.secretDir, ns);
    // The namespace exists either way; the admin can still fetch the secret over the wire.
    await writeSecretFile(file, secret).catch((err: Error) => this.log('warn', `cannot write secret file ${file}: ${err.message}`));
  }

  /** Restores any namespace secret file that is missing or stale (lost, or the secret dir moved). */
  private async exportSecrets(): Promise<void> {
    if (this.secretDir === undefined) return;
    for (const ns of this.store.listNamespaces().items) {
      const secret = this.store.namespaceSecret(ns);
      const current = await readFile(secretPath(this.secretDir, ns), 'utf8').catch(() => '');
      if (current.trim() !== secret) await this.exportSecret(ns, secret);
    }
  }
}

/** KvsServer.open(opts) then listen(host, port). */
export async function startKvsServer(opts: KvsServerOptions & { host?: string; port?: number } = {}): Promise<KvsServer> {
  const server = await KvsServer.open(opts);
  try {
    await server.listen(opts.host, opts.port);
  } catch (err) {
    await server.close();
    throw err;
  }
  return server;
}
