/**
 * The per-node daemon: wires configuration, the KVS (served here or reached
 * over the network), the transfer service and the managed-directory file
 * system, mounts it, and keeps it served until told to stop or unmounted.
 */
import fs from 'node:fs';
import path from 'node:path';
import v8 from 'node:v8';
import vm from 'node:vm';
import { FuseServer } from '../fuse/server.js';
import { requestChannel } from '../fuse/session.js';
import { canonicalMountpoint, clearStaleMount, isDyadMount, mountAt } from '../fuse/mount.js';
import { DmdFs } from '../dmd/dmd.js';
import { Storage } from '../dmd/storage.js';
import { evicts, type CacheSettings } from '../dmd/cache.js';
import { ConfigError, DyadError, errnos, pathError, systemError } from '../errors.js';
import { CachedKvs, EtcdKvs, KvsServer, SecretSource, openKvs, secretPath, type Kvs } from '../kvs/index.js';
import { backendFor } from '../dtl/index.js';
import type { TransferClient, TransferServer } from '../dtl/types.js';
import { makeDataDir, type DyadConfig } from './config.js';
import { Logger } from './log.js';

/** Unfinished files a restart names one by one in the log; the rest are counted. */
const UNFINISHED_NAMED = 20;

export interface DaemonOptions {
  config: DyadConfig;
  /** 'auto' uses kernel passthrough when the kernel offers it and we are root. */
  passthrough: 'auto' | 'off';
  ttlMs: number;
  spinUs: number;
  /** Leave permission checks to the kernel (default_permissions) even as root. */
  kernelPermissions?: boolean;
  /** fdatasync the served KVS's journal before acknowledging. */
  kvsFsync?: boolean;
  /** A served KVS drops ranks not renewed for this long. */
  rankLeaseMs?: number;
  /** A served KVS holds change events that follow a send within this long (fanout.ts). */
  kvsEventHoldMs?: number;
  /** Namespace secret file for a KVS served elsewhere (else DYAD_SECRET[_FILE], else the KVS data dir's). */
  secretFile?: string;
  logger: Logger;
}

export function validateMountpoint(mountpoint: string | undefined): string {
  if (!mountpoint) throw new ConfigError('no mountpoint: give MOUNTPOINT or set DYAD_PATH_CONSUMER / DYAD_PATH_PRODUCER');
  const mp = path.resolve(mountpoint);
  let st: fs.Stats;
  try {
    st = fs.statSync(mp);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOTCONN') return mp; // a dead mount of a killed daemon: cleared at start
    if (code === 'ENOENT') throw new ConfigError(`${mp}: no such directory`, errnos.ENOENT);
    if (code === 'EACCES') throw new ConfigError(`${mp}: permission denied`, errnos.EACCES);
    throw err;
  }
  if (!st.isDirectory()) throw new ConfigError(`${mp}: not a directory`, errnos.ENOTDIR);
  if (!fs.existsSync('/dev/fuse')) {
    throw new ConfigError('/dev/fuse is missing: this kernel or container has no FUSE', errnos.ENODEV);
  }
  // A second daemon would mount over the first and serve it as its storage:
  // every lookup through the mount would then come back to itself (ELOOP).
  if (isDyadMount(mountAt(canonicalMountpoint(mp)))) {
    throw new ConfigError(`${mp}: already mounted (a dyad-fs daemon serves it; dyad umount it first)`, errnos.EBUSY);
  }
  return mp;
}

/** A directory a setting names: missing (ENOENT) and not a directory (ENOTDIR) are different mistakes. */
function checkDir(setting: string, dir: string): void {
  let st: fs.Stats;
  try {
    st = fs.statSync(dir);
  } catch (err) {
    if (systemError(err)?.code === 'ENOENT') throw new ConfigError(`${setting} ${dir}: does not exist`, errnos.ENOENT);
    throw pathError(setting, dir, 'cannot use', err);
  }
  if (!st.isDirectory()) throw new ConfigError(`${setting} ${dir}: not a directory`, errnos.ENOTDIR);
}

function splitHostPort(hp: string): { host: string; port: number } {
  const i = hp.lastIndexOf(':');
  return { host: hp.slice(0, i).replace(/^\[|\]$/g, ''), port: Number(hp.slice(i + 1)) };
}

export class Daemon {
  private server?: FuseServer;
  private storage?: Storage;
  private kvsServer?: KvsServer;
  private kvs?: Kvs;
  private transferServer?: TransferServer;
  private transferClient?: TransferClient;
  private transferName?: string;
  private heartbeat?: NodeJS.Timeout;
  fs?: DmdFs;
  readonly mountpoint: string;
  /** The embedded KVS URL when this daemon serves it. */
  kvsUrl?: string;

  constructor(private readonly opts: DaemonOptions) {
    this.mountpoint = validateMountpoint(opts.config.mountpoint.value);
  }

  async start(): Promise<void> {
    try {
      await this.startInner();
    } catch (err) {
      await this.stop().catch(() => undefined);
      throw err;
    }
  }

  private async startInner(): Promise<void> {
    const log = this.opts.logger;
    const cfg = this.opts.config;
    const storageDir = path.resolve(cfg.storage.value ?? this.mountpoint);
    if (cfg.storage.value) checkDir('--storage', storageDir);
    const ns = cfg.namespace.value;
    const origin = cfg.origin.value;
    if (origin !== undefined) {
      checkDir(cfg.origin.from ?? '--origin', origin);
      const inside = (dir: string) => origin === dir || origin.startsWith(`${dir}/`) || dir.startsWith(`${origin}/`);
      // Reading the origin through the mount (or the storage through the origin) would wait on itself.
      if (inside(path.resolve(this.mountpoint)) || inside(storageDir)) {
        throw new ConfigError(`${cfg.origin.from} ${origin}: must be outside the mountpoint and the storage`, errnos.EINVAL);
      }
    }

    // Metadata: serve the embedded KVS here, or reach the configured one.
    let secret: string | undefined;
    if (!cfg.kvs.value) {
      const listen = splitHostPort(cfg.kvsServe.value ?? '127.0.0.1:0');
      makeDataDir(cfg.kvsData.value, cfg.kvsData.from ?? '--kvs-data');
      this.kvsServer = await KvsServer.open({
        dataDir: cfg.kvsData.value,
        // Journal writes reach the page cache before a change is acknowledged,
        // so a daemon restart loses nothing; --kvs-fsync also survives a
        // machine crash, at about 0.4 ms per publication on this disk.
        fsync: this.opts.kvsFsync ?? false,
        rankLeaseMs: this.opts.rankLeaseMs,
        eventHoldMs: this.opts.kvsEventHoldMs,
        keyDepth: cfg.keyDepth.value,
        keyBins: cfg.keyBins.value,
        log: (level, msg) => log[level](`kvs: ${msg}`),
      });
      const bound = await this.kvsServer.listen(listen.host, listen.port);
      this.kvsUrl = `dyad://${bound.host.includes(':') ? `[${bound.host}]` : bound.host}:${bound.port}`;
      if (!this.kvsServer.store.hasNamespace(ns)) await this.kvsServer.createNamespace(ns);
      secret = this.kvsServer.store.namespaceSecret(ns);
      log.info(
        `serving the embedded KVS at ${this.kvsUrl} (data in ${cfg.kvsData.value}, namespace ${ns}; change events in a burst held up to ${this.kvsServer.eventHoldMs} ms)`,
      );
    } else if (cfg.kvs.value.startsWith('etcd')) {
      // etcd keeps each namespace's secret with the namespace: whoever can
      // reach etcd can read it (secure etcd itself with TLS and users).
      secret = process.env.DYAD_SECRET || process.env.DYAD_SECRET_FILE || this.opts.secretFile ? await this.namespaceSecret(ns) : undefined;
    } else {
      const fallback = secretPath(path.join(cfg.kvsData.value, 'secrets'), ns);
      secret = await this.namespaceSecret(ns, fs.existsSync(fallback) ? fallback : undefined);
      if (!secret) {
        throw new ConfigError(`no secret for namespace ${ns}: set DYAD_SECRET or DYAD_SECRET_FILE, or pass --secret-file (the KVS exports it as <data>/secrets/${ns}.secret)`);
      }
    }
    if (this.kvsServer) {
      // Serving it here: use the store directly, no loopback socket. The
      // cache is what keeps the small files other nodes push with their
      // publications (it drops the bytes of our own at once); its records
      // are exact (the store tells it of every change before answering anyone).
      const cached = new CachedKvs(this.kvsServer.localClient());
      this.kvs = cached;
      if (!(await cached.watching(ns))) throw new DyadError('DYAD_EKVS', errnos.EIO, `kvs: cannot watch namespace ${ns} of the KVS served here`);
    } else {
      const url = cfg.kvs.value!;
      const rankLeaseTtlSec = Math.max(1, Math.ceil((this.opts.rankLeaseMs ?? 10_000) / 1000));
      const raw = await openKvs(url, secret ? { secret, rankLeaseTtlSec } : { rankLeaseTtlSec });
      if (!(await raw.hasNamespace(ns).catch(() => false))) {
        await raw.close();
        throw new ConfigError(`namespace ${ns} does not exist in ${url} (create it with: dyad namespace create ${ns} --kvs ${url})`, errnos.ENOENT);
      }
      if (raw instanceof EtcdKvs) {
        // etcd keeps the namespace's secret; one given here that differs
        // would only show later, as every pull refused by its owner.
        const kept = await raw.namespaceSecret(ns);
        if (secret && kept && secret !== kept) {
          await raw.close();
          throw new ConfigError(`the secret given (DYAD_SECRET, DYAD_SECRET_FILE or --secret-file) is not namespace ${ns}'s in ${url}`, errnos.EACCES);
        }
        secret ??= kept;
      }
      if (!secret) throw new ConfigError(`no secret for namespace ${ns}`);
      // No cached absences: a stat right after another node published (and
      // told us by other means) must see the file.
      const cached = new CachedKvs(raw, { cacheNegative: false });
      this.kvs = cached;
      // Subscribe now rather than at the first lookup: records published
      // from here on reach the cache as they happen, so a reader's first
      // open of a file produced meanwhile costs no KVS round trip.
      if (!(await cached.watching(ns))) log.warn(`kvs: no change notifications for namespace ${ns}; records are cached for 1 s only`);
    }

    // Transfers: serve our storage to other nodes, pull from theirs.
    if (clearStaleMount(this.mountpoint)) log.warn(`cleared a stale mount at ${this.mountpoint} (its daemon had died)`);
    this.storage = Storage.open(storageDir);
    if (!cfg.sharedStorage.value) {
      if (!secret) throw new ConfigError(`no secret for namespace ${ns}`);
      const backend = backendFor(cfg.dtl.value);
      const listen = splitHostPort(cfg.listen.value);
      if (listen.host === '0.0.0.0' || listen.host === '::') {
        throw new ConfigError(`--listen ${cfg.listen.value}: give the address other nodes reach this one at, not a wildcard`);
      }
      this.transferServer = await backend.serve({ root: this.storage.root, host: listen.host, port: listen.port, secret });
      this.transferClient = backend.client({ secret });
      this.transferName = backend.name;
      const info = { rank: cfg.rank.value, address: this.transferServer.address, meta: { dtl: backend.name } };
      await this.kvs.registerRank(ns, info);
      // The registration is a lease: renewing it says this node is alive.
      const kvs = this.kvs;
      this.heartbeat = setInterval(() => {
        kvs.registerRank(ns, info).catch((err: Error) => log.warn(`rank renewal failed: ${err.message}`));
      }, Math.min(3000, (this.opts.rankLeaseMs ?? 10_000) / 3));
      this.heartbeat.unref();
      log.info(`rank ${cfg.rank.value}: ${backend.name} transfer service at ${this.transferServer.address}`);
    }

    const isRoot = process.getuid?.() === 0;
    const wantPassthrough = this.opts.passthrough === 'auto' && isRoot;
    const cache: CacheSettings = {
      capacityBytes: cfg.cacheCapacityBytes.value,
      policy: cfg.cachePolicy.value,
      lowWatermark: cfg.cacheLowWatermark.value,
      graceMs: cfg.cacheGraceMs.value,
    };
    const fsys = new DmdFs(this.storage, {
      passthrough: wantPassthrough,
      ttlMs: this.opts.ttlMs,
      kernelPermissions: this.opts.kernelPermissions,
      mountpoint: this.mountpoint,
      kvs: this.kvs,
      ns,
      rank: cfg.rank.value,
      serviceMux: cfg.serviceMux.value,
      sharedStorage: cfg.sharedStorage.value,
      transfer: this.transferClient,
      dtlName: this.transferName,
      asyncPublish: cfg.asyncPublish.value,
      fsyncWrite: cfg.fsyncWrite.value,
      waitTimeoutMs: cfg.waitTimeoutMs.value,
      peerTimeoutMs: cfg.peerTimeoutMs.value,
      rankLeaseMs: this.opts.rankLeaseMs,
      pushMaxBytes: cfg.pushMaxBytes.value,
      origin,
      cache,
      log,
    });
    this.fs = fsys;
    const server = new FuseServer(this.mountpoint, fsys, { passthrough: wantPassthrough, spinUs: this.opts.spinUs });
    this.server = server;
    server.on('warning', (err: Error) => log.warn(err.message));
    if (log.enabled('debug')) {
      requestChannel.subscribe((m) => {
        const r = m as { op: string; nodeid: number; pid: number };
        log.debug(`${r.op} node=${r.nodeid} pid=${r.pid}`);
      });
    }
    const info = await server.start((s) => fsys.attach(s));
    const reason = fsys.passthroughActive
      ? 'on'
      : this.opts.passthrough === 'off'
        ? 'off (--passthrough off)'
        : !isRoot
          ? 'off (needs CAP_SYS_ADMIN; the daemon serves reads and writes)'
          : 'off (the kernel did not offer it; the daemon serves reads and writes)';
    // In the background: the mount is usable meanwhile, and a reader of a
    // file not yet republished simply waits for it.
    void fsys.republishStorage().then(
      ({ published, kept, unfinished }) => {
        const shown = unfinished.slice(0, UNFINISHED_NAMED);
        for (const f of shown) log.warn(`${f} not published: its writer never closed it (killed, or cut off when the last daemon stopped); it stays on this node (to publish it as it is, open it for writing and close it: \`: >> FILE\`)`);
        if (unfinished.length > shown.length) log.warn(`and ${unfinished.length - shown.length} more files like it`);
        if (published || kept || unfinished.length) log.info(`storage scan: published ${published} files, ${kept} already published, ${unfinished.length} left unpublished as unfinished`);
      },
      (err: Error) => log.warn(`storage scan failed: ${err.message}`),
    );
    log.info(
      `serving ${this.mountpoint} from ${storageDir} (FUSE 7.${info.minor}, passthrough ${reason}, permissions checked by ${fsys.checksPermissions ? 'the daemon as each caller' : 'the kernel'}; rank ${cfg.rank.value}, namespace ${ns}${cfg.sharedStorage.value ? ', shared storage' : ''}${origin ? `, origin ${origin}` : ''}${evicts(cache) ? `, copies kept up to ${cache.capacityBytes} B (${cache.policy})` : ''})`,
    );
  }

  /**
   * The namespace secret from --secret-file, else DYAD_SECRET or
   * DYAD_SECRET_FILE, else `fallback` (the served KVS's export); a secret
   * that cannot be had is reported with the setting that pointed at it.
   */
  private async namespaceSecret(ns: string, fallback?: string): Promise<string | undefined> {
    const env = process.env;
    const file = this.opts.secretFile ?? (env.DYAD_SECRET || env.DYAD_SECRET_FILE ? undefined : fallback);
    const from = this.opts.secretFile !== undefined ? '--secret-file' : env.DYAD_SECRET ? 'DYAD_SECRET' : env.DYAD_SECRET_FILE ? 'DYAD_SECRET_FILE' : this.opts.config.kvsData.from ?? '--kvs-data';
    try {
      return await new SecretSource(file ? { secretFile: file } : {}).namespaceSecret(ns);
    } catch (err) {
      if (err instanceof DyadError) throw new ConfigError(err.message.includes(from) ? err.message : `${from}: ${err.message}`, err.errno);
      throw err;
    }
  }

  /**
   * Request counts by opcode since start, the node table's size and memory.
   * The heap figure is taken after a full collection: without one it counts
   * garbage V8 has not needed to collect yet, and says nothing about what
   * the daemon keeps.
   */
  stats(): Record<string, number> {
    fullGc();
    const mem = process.memoryUsage();
    return {
      ...(this.server?.session?.stats() ?? {}),
      nodes: this.fs?.nodeCount ?? 0,
      rssMiB: Math.round(mem.rss / 2 ** 20),
      heapUsedMiB: Math.round(mem.heapUsed / 2 ** 20),
    };
  }

  onUnmounted(cb: () => void): void {
    if (!this.server) throw new DyadError('DYAD_ESTATE', errnos.EINVAL, 'daemon not started');
    this.server.on('unmounted', cb);
  }

  async stop(): Promise<void> {
    if (this.heartbeat) clearInterval(this.heartbeat);
    await this.server?.stop();
    this.fs?.stop();
    await this.fs?.fetcher.flushCopies();
    await this.transferServer?.close().catch(() => undefined);
    await this.transferClient?.close().catch(() => undefined);
    await this.kvs?.close().catch(() => undefined);
    await this.kvsServer?.close().catch(() => undefined);
    this.storage?.close();
    this.storage = undefined;
  }
}

/** A full garbage collection, for a memory figure that means something (rare, on request only). */
function fullGc(): void {
  v8.setFlagsFromString('--expose-gc');
  const gc: unknown = vm.runInNewContext('gc');
  if (typeof gc === 'function') gc();
}
