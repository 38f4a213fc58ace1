/**
 * The etcd backend: a WatchableKvs with the embedded store's semantics, kept
 * in etcd under the layout of layout.ts, so that a deployment can use an
 * existing, replicated etcd cluster instead of the embedded server.
 *
 * Consistency comes from etcd transactions, not from a single server thread:
 * every change is one transaction guarded by compares on what it read (the
 * namespace marker, the directories it relies on), retried on conflict, so the
 * tree stays well formed under concurrent clients. Directory records are
 * rewritten whenever their entry set changes, so a directory's mod_revision
 * doubles as a guard on its entry set. Reads are linearizable, and a wait is a
 * read followed by a watch from exactly the next revision, so no publication
 * can slip between the two, across reconnects included (watch.ts).
 *
 * Requests are retried while etcd is unreachable, up to requestTimeoutMs; wait()
 * has no such limit unless given a timeout. Ranks are registered under a lease
 * kept alive by this client, so the registration of a daemon that dies expires
 * after rankLeaseTtlSec.
 */
import { randomBytes } from 'node:crypto';
import type { Etcd3, ICompare, IKeyValue, IRequestOp, IResponseOp, Lease } from 'etcd3';
import { ConfigError, DyadError } from '../../errors.js';
import { generateSecret, SecretSource, type SecretOptions } from '../embedded/secrets.js';
import { closedError, interrupted, invalidArgument, isDyadError, kvsError, noNamespace, timedOut } from '../errors.js';
import { genPathKey, keyParamsFromEnv, checkKeyParams } from '../key.js';
import type { DirEntry, FileRecord, KvsWatchListener, PublishInput, RankInfo, WaitOptions, WatchableKvs } from '../types.js';
import { checkUpath } from '../upath.js';
import { checkNamespace, checkPublishInput, checkRank, checkRankInfo } from '../validate.js';
import {
  decodeMeta,
  decodeRank,
  decodeRecord,
  encodeDir,
  encodeFile,
  encodeMeta,
  encodeRank,
  EtcdLayout,
  type NsMeta,
} from './layout.js';
import { NsWatch, type NsWatchHost, type RankListener, type Waiter } from './nswatch.js';
import { etcdFailure, etcdGaveUp, isTransient, isUnreachable, loadEtcd3, retryPolicy, type CallOptions, type Etcd3Module } from './rpc.js';
import { parseEtcdUrl } from './url.js';
import { WatchHub } from './watch.js';

export type { RankEvent, RankListener } from './nswatch.js';

export interface EtcdKvsOptions extends SecretOptions {
  /** Deadline of each request other than wait(), retries while etcd is unreachable included; 0 = none. Default 30 s. */
  requestTimeoutMs?: number;
  /** How long connect() keeps trying to reach etcd. Default 10 s. */
  connectTimeoutMs?: number;
  /** Retry and watch-reconnect backoff bounds. Defaults 50 ms and 2 s. */
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
  /** Key parameters of namespaces this client creates; default DYAD_KEY_DEPTH / DYAD_KEY_BINS. */
  keyDepth?: number;
  keyBins?: number;
  env?: NodeJS.ProcessEnv;
  /** TTL of the lease rank registrations are held under; 0 = registrations never expire. Default 10 s. */
  rankLeaseTtlSec?: number;
  /** How long a namespace watch outlives its last waiter or listener (saves re-creating it). Default 10 s. */
  watchLingerMs?: number;
  /** etcd's --max-txn-ops; bounds the depth of a publishable path. Default 128 (etcd's default). */
  maxTxnOps?: number;
}

const PAGE = 1000;
/** How long past its timeout a wait's first lookup may take to find the record (as the embedded client allows). */
const WAIT_GRACE_MS = 2000;
/** Operations a publish or unpublish needs besides one per path component. */
const TXN_OVERHEAD = 4;

interface CachedMeta {
  createRev: string;
  meta: NsMeta;
}

/** What publish plans from: the namespace incarnation, and per path prefix the incarnation and kind there. */
interface PathState {
  meta: NsMeta;
  metaCreate: string;
  nodes: Array<{ create: string; kind: 'file' | 'dir' } | undefined>;
}

/** Directory incarnations remembered for publish's guess; cleared wholesale beyond this. */
const MAX_KNOWN_DIRS = 100_000;

const rangeOp = (key: Buffer, more: Partial<NonNullable<IRequestOp['request_range']>> = {}): IRequestOp => ({ request_range: { key, ...more } });
const putOp = (key: Buffer, value: Buffer, lease?: string): IRequestOp => ({ request_put: lease === undefined ? { key, value } : { key, value, lease } });
const deleteOp = (key: Buffer): IRequestOp => ({ request_delete_range: { key } });
const createIs = (key: Buffer, rev: string): ICompare => ({ key, target: 'Create', result: 'Equal', create_revision: rev });
const modIs = (key: Buffer, rev: string): ICompare => ({ key, target: 'Mod', result: 'Equal', mod_revision: rev });

function kvAt(responses: IResponseOp[], i: number): IKeyValue | undefined {
  return responses[i]?.response_range?.kvs[0];
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Requests that gave up only because etcd could not be reached in time; a wait tries again. */
function unreachableGiveUp(err: unknown): boolean {
  return isDyadError(err) && (err.code === 'DYAD_ECONNREFUSED' || err.code === 'DYAD_ETIMEDOUT');
}

function byName(a: DirEntry, b: DirEntry): number {
  return a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
}

export class EtcdKvs implements WatchableKvs, NsWatchHost {
  readonly layout: EtcdLayout;
  /** The members, for messages. */
  readonly endpoints: string;
  readonly rankLeaseTtlSec: number;
  private readonly lib: Etcd3Module;
  private readonly client: Etcd3;
  private readonly hub: WatchHub;
  private readonly secrets: SecretSource;
  private readonly keyDepth: number;
  private readonly keyBins: number;
  private readonly requestTimeoutMs: number;
  private readonly reconnectMinMs: number;
  private readonly reconnectMaxMs: number;
  private readonly watchLingerMs: number;
  private readonly maxComponents: number;
  private readonly metas = new Map<string, CachedMeta>();
  /** `${ns}\0${dir}` -> create_revision of a directory entry this client saw exist. */
  private readonly dirs = new Map<string, string>();
  private readonly watchers = new Map<string, NsWatch>();
  private readonly waits = new Set<Waiter>();
  /** Ranks this client registered, to register again under a new lease if the old one is lost. */
  private readonly registered = new Map<string, Map<number, RankInfo>>();
  private lease: Lease | undefined;
  private reRegistering = false;
  private closed = false;

  private constructor(lib: Etcd3Module, url: string, opts: EtcdKvsOptions) {
    this.lib = lib;
    const parsed = parseEtcdUrl(url);
    this.layout = new EtcdLayout(parsed.prefix);
    this.endpoints = parsed.endpoints.join(',');
    const env = keyParamsFromEnv(opts.env ?? process.env);
    this.keyDepth = opts.keyDepth ?? env.depth;
    this.keyBins = opts.keyBins ?? env.bins;
    checkKeyParams(this.keyDepth, this.keyBins);
    this.secrets = new SecretSource(opts, opts.env ?? process.env);
    this.requestTimeoutMs = opts.requestTimeoutMs ?? 30_000;
    this.reconnectMinMs = opts.reconnectMinMs ?? 50;
    this.reconnectMaxMs = Math.max(this.reconnectMinMs, opts.reconnectMaxMs ?? 2000);
    this.watchLingerMs = opts.watchLingerMs ?? 10_000;
    this.rankLeaseTtlSec = opts.rankLeaseTtlSec ?? 10;
    if (!Number.isInteger(this.rankLeaseTtlSec) || this.rankLeaseTtlSec < 0) {
      throw new ConfigError(`rankLeaseTtlSec ${this.rankLeaseTtlSec} is invalid: use a whole number of seconds, or 0 for no lease`);
    }
    this.maxComponents = (opts.maxTxnOps ?? 128) - TXN_OVERHEAD;
    const requestTimeoutMs = this.requestTimeoutMs;
    this.client = new lib.Etcd3({
      hosts: parsed.endpoints.map((e) => `http://${e}`),
      grpcOptions: {
        // A namespace removal arrives as one watch response holding every deleted key.
        'grpc.max_receive_message_length': 512 * 1024 * 1024,
        // Notice a silently dead member (no RST) within ~15 s instead of never.
        'grpc.keepalive_time_ms': 10_000,
        'grpc.keepalive_timeout_ms': 5_000,
        'grpc.initial_reconnect_backoff_ms': this.reconnectMinMs,
        'grpc.max_reconnect_backoff_ms': this.reconnectMaxMs,
      },
      defaultCallOptions: (ctx) => (ctx.isStream || requestTimeoutMs <= 0 ? {} : { deadline: Date.now() + requestTimeoutMs }),
      faultHandling: { host: () => retryPolicy(1), global: retryPolicy(parsed.endpoints.length) },
    });
    this.hub = new WatchHub(this.client, { reconnectMinMs: this.reconnectMinMs, reconnectMaxMs: this.reconnectMaxMs });
  }

  /** Connects (retrying for connectTimeoutMs); DYAD_ECONNREFUSED if etcd stays unreachable. */
  static async connect(url: string, opts: EtcdKvsOptions = {}): Promise<EtcdKvs> {
    parseEtcdUrl(url); // a bad URL fails before the load
    const kvs = new EtcdKvs(await loadEtcd3(), url, opts);
    const limit = opts.connectTimeoutMs ?? 10_000;
    try {
      const r = kvs.layout.nsIndexRange();
      await kvs.request('a connection check', (o) => kvs.client.kv.range({ key: r.key, range_end: r.end, count_only: true }, o), limit);
    } catch (err) {
      await kvs.close();
      const why = err instanceof Error ? err.message : String(err);
      throw kvsError('DYAD_ECONNREFUSED', 'ECONNREFUSED', `cannot reach etcd at ${kvs.endpoints} within ${limit} ms: ${why}`, err);
    }
    return kvs;
  }

  // ---- files ----

  async lookup(ns: string, upath: string): Promise<FileRecord | undefined> {
    return (await this.lookupAt(ns, upath)).rec;
  }

  async publish(ns: string, upath: string, input: PublishInput): Promise<FileRecord> {
    this.checkOpen();
    checkNamespace(ns);
    this.checkPath(upath);
    const clean = checkPublishInput(input);
    const parts = upath.split('/');
    const n = parts.length;
    const paths = parts.map((_, i) => parts.slice(0, i + 1).join('/'));
    const L = this.layout;
    const reads = (): IRequestOp[] => [rangeOp(L.meta(ns)), ...paths.map((p) => rangeOp(L.entry(ns, p)))];
    const rev = await this.request(`publish of ${JSON.stringify(upath)}`, async (o) => {
      // A new file in a directory we know: skip the read. The compares make a wrong
      // guess harmless; it fails and hands back the reads.
      let state = this.guessPath(ns, paths) ?? this.pathState(ns, paths, (await this.client.kv.txn({ success: reads() }, o)).responses);
      for (;;) {
        const { meta, metaCreate, nodes } = state;
        // k = how many ancestors exist; all of them must be directories.
        let k = 0;
        while (k < n - 1 && nodes[k] !== undefined) {
          if (nodes[k]!.kind === 'file') {
            throw kvsError('DYAD_ENOTDIR', 'ENOTDIR', `cannot publish ${JSON.stringify(upath)} in namespace ${JSON.stringify(ns)}: ${JSON.stringify(paths[k])} is a file`);
          }
          k++;
        }
        const target = k === n - 1 ? nodes[n - 1] : undefined;
        if (target?.kind === 'dir') {
          throw kvsError('DYAD_EISDIR', 'EISDIR', `cannot publish ${JSON.stringify(upath)} in namespace ${JSON.stringify(ns)}: it is a directory`);
        }
        // The deepest existing ancestor still existing implies all above it do; the first
        // missing one still missing implies all below it are. A key's incarnation
        // (create_revision) never changes kind, so these also pin file versus directory.
        const compare: ICompare[] = [createIs(L.meta(ns), metaCreate)];
        if (k >= 1) compare.push(createIs(L.entry(ns, paths[k - 1]!), nodes[k - 1]!.create));
        compare.push(createIs(L.entry(ns, paths[k]!), k < n - 1 ? '0' : (target?.create ?? '0')));
        const t = Date.now();
        const value = encodeFile(clean);
        const ops: IRequestOp[] = [putOp(L.file(ns, genPathKey(upath, meta.keyDepth, meta.keyBins)), value), putOp(L.entry(ns, upath), value)];
        for (let i = k; i < n - 1; i++) ops.push(putOp(L.entry(ns, paths[i]!), encodeDir(t)));
        // A new entry changes the directory that receives it (a mtime and version bump).
        if (target === undefined) ops.push(putOp(k === 0 ? L.rootDir(ns) : L.entry(ns, paths[k - 1]!), encodeDir(t)));
        const res = await this.client.kv.txn({ compare, success: ops, failure: reads() }, o);
        if (res.succeeded) {
          for (let i = k; i < n - 1; i++) this.knowDir(ns, paths[i]!, res.header.revision);
          return Number(res.header.revision);
        }
        state = this.pathState(ns, paths, res.responses);
      }
    });
    await this.barrier(ns, rev);
    return { ...clean, version: rev, kind: 'file' };
  }

  async unpublish(ns: string, upath: string): Promise<boolean> {
    this.checkOpen();
    checkNamespace(ns);
    this.checkPath(upath);
    const parts = upath.split('/');
    const n = parts.length;
    const paths = parts.map((_, i) => parts.slice(0, i + 1).join('/'));
    // dirs[j]: the j-th directory on the way down, '' (root) first; dirs[n - 1] is the parent.
    const dirs = ['', ...paths.slice(0, n - 1)];
    const L = this.layout;
    const count = (dir: string): IRequestOp => {
      const r = L.entries(ns, dir);
      return rangeOp(r.key, { range_end: r.end, keys_only: true, limit: 2 });
    };
    const rev = await this.request(`unpublish of ${JSON.stringify(upath)}`, async (o) => {
      for (;;) {
        const snap = (
          await this.client.kv.txn({ success: [rangeOp(L.meta(ns)), rangeOp(L.rootDir(ns)), ...paths.map((p) => rangeOp(L.entry(ns, p))), count(dirs[n - 1]!)] }, o)
        ).responses;
        const metaKv = kvAt(snap, 0);
        if (metaKv === undefined) throw this.gone(ns);
        const meta = this.adopt(ns, metaKv);
        const rootKv = kvAt(snap, 1);
        const kvs = paths.map((_, i) => kvAt(snap, i + 2));
        const target = kvs[n - 1];
        if (target === undefined) return undefined;
        if (decodeRecord(target).kind === 'dir') {
          throw kvsError('DYAD_EISDIR', 'EISDIR', `KVS path ${JSON.stringify(upath)} in namespace ${JSON.stringify(ns)} is a directory`);
        }
        if (rootKv === undefined || kvs.some((kv) => kv === undefined)) {
          // Our transactions never leave a file without its directories; someone else wrote here.
          throw kvsError('DYAD_EIO', 'EIO', `KVS namespace ${JSON.stringify(ns)} in etcd at ${this.endpoints} is damaged: ${JSON.stringify(upath)} exists without all of its directories`);
        }
        const counts = new Map<number, number>([[n - 1, snap[n + 2]?.response_range.kvs.length ?? 0]]);
        // Directories exist only while they hold something: drop the ones this empties, upwards.
        let j = n - 1;
        while (j >= 1) {
          if (!counts.has(j)) {
            const more = dirs.slice(1, j + 1);
            const r = await this.client.kv.txn({ success: more.map((d) => count(d)) }, o);
            more.forEach((_, i) => counts.set(i + 1, r.responses[i]?.response_range.kvs.length ?? 0));
          }
          if (counts.get(j)! > 1) break;
          j--;
        }
        const compare: ICompare[] = [createIs(L.meta(ns), metaKv.create_revision), modIs(L.entry(ns, upath), target.mod_revision)];
        const ops: IRequestOp[] = [deleteOp(L.file(ns, genPathKey(upath, meta.keyDepth, meta.keyBins))), deleteOp(L.entry(ns, upath))];
        for (let i = n - 1; i > j; i--) {
          compare.push(modIs(L.entry(ns, dirs[i]!), kvs[i - 1]!.mod_revision));
          ops.push(deleteOp(L.entry(ns, dirs[i]!)));
        }
        const survivor = j === 0 ? L.rootDir(ns) : L.entry(ns, dirs[j]!);
        compare.push(modIs(survivor, j === 0 ? rootKv.mod_revision : kvs[j - 1]!.mod_revision));
        ops.push(putOp(survivor, encodeDir(Date.now())));
        const res = await this.client.kv.txn({ compare, success: ops }, o);
        if (res.succeeded) {
          for (let i = n - 1; i > j; i--) this.forgetDir(ns, dirs[i]!);
          return Number(res.header.revision);
        }
      }
    });
    if (rev === undefined) return false;
    await this.barrier(ns, rev);
    return true;
  }

  async list(ns: string, dirUpath: string): Promise<DirEntry[]> {
    this.checkOpen();
    checkNamespace(ns);
    checkUpath(dirUpath, true);
    this.checkUtf8(dirUpath);
    const L = this.layout;
    const r = L.entries(ns, dirUpath);
    return this.request(`listing of ${JSON.stringify(dirUpath)}`, async (o) => {
      const res = await this.client.kv.txn(
        { success: [rangeOp(L.meta(ns)), rangeOp(L.dirRecord(ns, dirUpath)), rangeOp(r.key, { range_end: r.end, limit: PAGE })] },
        o,
      );
      const metaKv = kvAt(res.responses, 0);
      if (metaKv === undefined) throw this.gone(ns);
      this.adopt(ns, metaKv);
      const dirKv = kvAt(res.responses, 1);
      if (dirKv === undefined) {
        throw kvsError('DYAD_ENOENT', 'ENOENT', `KVS directory ${JSON.stringify(dirUpath)} does not exist in namespace ${JSON.stringify(ns)}`);
      }
      if (decodeRecord(dirKv).kind !== 'dir') {
        throw kvsError('DYAD_ENOTDIR', 'ENOTDIR', `KVS path ${JSON.stringify(dirUpath)} in namespace ${JSON.stringify(ns)} is a file`);
      }
      // Later pages are read at the first page's revision, so the listing is one snapshot.
      const kvs = await this.rest(res.responses[2]!.response_range, r.end, res.header.revision, o);
      return kvs.map((kv) => ({ name: L.entryName(ns, dirUpath, kv.key), record: decodeRecord(kv) })).sort(byName);
    });
  }

  wait(ns: string, upath: string, opts: WaitOptions = {}): Promise<FileRecord> {
    return new Promise<FileRecord>((resolve, reject) => {
      this.checkOpen();
      checkNamespace(ns);
      checkUpath(upath, true);
      const what = `KVS wait of ${JSON.stringify(upath)}`;
      const { timeoutMs, signal } = opts;
      if (timeoutMs !== undefined && (!Number.isFinite(timeoutMs) || timeoutMs < 0)) {
        throw invalidArgument(`timeoutMs must be a non-negative number, got ${timeoutMs}`);
      }
      if (signal?.aborted === true) throw interrupted(what);
      let timer: NodeJS.Timeout | undefined;
      let on: NsWatch | undefined;
      let expired = false;
      let failures = 0;
      const finish = (): void => {
        waiter.done = true;
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        this.waits.delete(waiter);
        if (on !== undefined) {
          on.removeWaiter(waiter);
          this.idle(on);
        }
      };
      const waiter: Waiter = {
        upath,
        after: 0,
        done: false,
        resolve: (rec) => {
          if (waiter.done) return;
          finish();
          resolve(rec);
        },
        reject: (err) => {
          if (waiter.done) return;
          finish();
          reject(err);
        },
      };
      const onAbort = (): void => waiter.reject(interrupted(what));
      this.waits.add(waiter);
      signal?.addEventListener('abort', onAbort, { once: true });
      if (timeoutMs !== undefined) {
        // A record that exists wins over the timeout, so the first lookup gets to answer,
        // unless etcd has already failed it or takes longer than a grace period.
        timer = setTimeout(() => {
          expired = true;
          if (on !== undefined || failures > 0) waiter.reject(timedOut(what, timeoutMs));
          else timer = setTimeout(() => waiter.reject(timedOut(what, timeoutMs)), WAIT_GRACE_MS);
        }, timeoutMs);
      }
      void (async () => {
        let delay = this.reconnectMinMs;
        for (;;) {
          let found: { rec: FileRecord | undefined; rev: number };
          try {
            found = await this.lookupAt(ns, upath);
          } catch (err) {
            if (waiter.done) return;
            if (!unreachableGiveUp(err) || expired) {
              waiter.reject(expired && unreachableGiveUp(err) ? timedOut(what, timeoutMs!) : (err as DyadError));
              return;
            }
            failures++;
            await sleep(delay);
            delay = Math.min(delay * 2, this.reconnectMaxMs);
            if (waiter.done) return;
            continue;
          }
          if (waiter.done) return;
          if (found.rec !== undefined) return waiter.resolve(found.rec);
          if (expired) return waiter.reject(timedOut(what, timeoutMs!));
          const w = this.watcherFor(ns, found.rev + 1);
          on = w;
          waiter.after = found.rev;
          w.addWaiter(waiter);
          // The shared watch had already passed our read's revision: what it delivered
          // before we joined is not lost, just not seen by us, so read again.
          if (w.nextRev > found.rev + 1) this.recheck(w, waiter);
          return;
        }
      })();
    });
  }

  // ---- namespaces ----

  async createNamespace(ns: string): Promise<void> {
    this.checkOpen();
    checkNamespace(ns);
    const meta: NsMeta = {
      id: randomBytes(16).toString('hex'),
      secret: this.secrets.explicitSecret ?? generateSecret(),
      createdMs: Date.now(),
      keyDepth: this.keyDepth,
      keyBins: this.keyBins,
    };
    const L = this.layout;
    await this.request(`creation of namespace ${JSON.stringify(ns)}`, async (o, attempt) => {
      const res = await this.client.kv.txn(
        {
          compare: [createIs(L.meta(ns), '0')],
          success: [putOp(L.meta(ns), encodeMeta(meta)), putOp(L.rootDir(ns), encodeDir(meta.createdMs)), putOp(L.nsIndex(ns), Buffer.alloc(0))],
          failure: [rangeOp(L.meta(ns))],
        },
        o,
      );
      const kv = res.succeeded ? undefined : kvAt(res.responses, 0);
      // After a lost reply, finding our own marker means the first attempt went through.
      if (kv !== undefined && !(attempt > 1 && decodeMeta(kv).id === meta.id)) {
        throw kvsError('DYAD_EEXIST', 'EEXIST', `KVS namespace ${JSON.stringify(ns)} already exists`);
      }
    });
  }

  async removeNamespace(ns: string): Promise<void> {
    this.checkOpen();
    checkNamespace(ns);
    const L = this.layout;
    const r = L.nsRange(ns);
    let sent = false;
    await this.request(`removal of namespace ${JSON.stringify(ns)}`, async (o) => {
      for (;;) {
        const metaKv = kvAt((await this.client.kv.txn({ success: [rangeOp(L.meta(ns))] }, o)).responses, 0);
        if (metaKv === undefined) {
          this.metas.delete(ns);
          // After a lost reply, an absent namespace is most likely our own doing.
          if (sent) return;
          throw noNamespace(ns);
        }
        sent = true;
        const res = await this.client.kv.txn(
          {
            compare: [createIs(L.meta(ns), metaKv.create_revision)],
            success: [{ request_delete_range: { key: r.key, range_end: r.end } }, deleteOp(L.nsIndex(ns))],
          },
          o,
        );
        if (res.succeeded) {
          this.metas.delete(ns);
          this.registered.delete(ns);
          return;
        }
      }
    });
  }

  async listNamespaces(): Promise<string[]> {
    this.checkOpen();
    const r = this.layout.nsIndexRange();
    return this.request('listing of namespaces', async (o) => {
      const first = await this.client.kv.range({ key: r.key, range_end: r.end, keys_only: true, limit: PAGE }, o);
      const kvs = await this.rest(first, r.end, first.header.revision, o, true);
      return kvs.map((kv) => this.layout.nsFromIndex(kv.key)).sort();
    });
  }

  async hasNamespace(ns: string): Promise<boolean> {
    this.checkOpen();
    checkNamespace(ns);
    return this.request('namespace check', async (o) => {
      const res = await this.client.kv.range({ key: this.layout.meta(ns), count_only: true }, o);
      return Number(res.count) > 0;
    });
  }

  /** The namespace's secret (for the transfer service), as stored with its marker. */
  async namespaceSecret(ns: string): Promise<string> {
    this.checkOpen();
    checkNamespace(ns);
    return this.request('namespace secret lookup', async (o) => {
      this.metas.delete(ns);
      return (await this.nsMeta(ns, o)).secret;
    });
  }

  // ---- ranks ----

  async registerRank(ns: string, info: RankInfo): Promise<void> {
    this.checkOpen();
    checkNamespace(ns);
    const clean = checkRankInfo(info);
    // Remembered before the put, so a lease lost while it is in flight re-registers it too.
    let mine = this.registered.get(ns);
    if (mine === undefined) this.registered.set(ns, (mine = new Map()));
    const before = mine.get(clean.rank);
    mine.set(clean.rank, clean);
    let rev: number;
    try {
      rev = await this.putRank(ns, clean);
    } catch (err) {
      if (before === undefined) mine.delete(clean.rank);
      else mine.set(clean.rank, before);
      throw err;
    }
    await this.barrier(ns, rev);
  }

  async lookupRank(ns: string, rank: number): Promise<RankInfo | undefined> {
    this.checkOpen();
    checkNamespace(ns);
    checkRank(rank);
    const L = this.layout;
    return this.request(`lookup of rank ${rank}`, async (o) => {
      const res = await this.client.kv.txn({ success: [rangeOp(L.meta(ns)), rangeOp(L.rank(ns, rank))] }, o);
      if (kvAt(res.responses, 0) === undefined) throw this.gone(ns);
      const kv = kvAt(res.responses, 1);
      return kv === undefined ? undefined : decodeRank(kv);
    });
  }

  async listRanks(ns: string): Promise<RankInfo[]> {
    this.checkOpen();
    checkNamespace(ns);
    const L = this.layout;
    const r = L.ranks(ns);
    return this.request('listing of ranks', async (o) => {
      const res = await this.client.kv.txn({ success: [rangeOp(L.meta(ns)), rangeOp(r.key, { range_end: r.end, limit: PAGE })] }, o);
      if (kvAt(res.responses, 0) === undefined) throw this.gone(ns);
      const kvs = await this.rest(res.responses[1]!.response_range, r.end, res.header.revision, o);
      return kvs.map(decodeRank);
    });
  }

  /**
   * Rank registrations and their removal (lease expiry of a dead daemon, or a
   * closed client's revocation) in namespace ns, as they happen.
   */
  async watchRanks(ns: string, listener: RankListener): Promise<() => void> {
    const w = await this.subscribe(ns);
    w.rankListeners.add(listener);
    return this.liveOrDrop(w, () => w.rankListeners.delete(listener));
  }

  // ---- watching ----

  async watch(ns: string, listener: KvsWatchListener): Promise<() => void> {
    const w = await this.subscribe(ns);
    w.listeners.add(listener);
    return this.liveOrDrop(w, () => w.listeners.delete(listener));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const err = closedError('KVS handle');
    for (const w of [...this.waits]) w.reject(err);
    for (const w of [...this.watchers.values()]) w.shutdown(err);
    this.watchers.clear();
    this.hub.close();
    const lease = this.lease;
    this.lease = undefined;
    if (lease !== undefined) {
      // Our registrations go with us; a crash leaves them to expire instead. Bounded,
      // because revoke first awaits a grant that may still be retrying.
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        lease.revoke({ deadline: Date.now() + 2000 }).catch(() => undefined),
        new Promise<void>((r) => (timer = setTimeout(r, 2000))),
      ]);
      clearTimeout(timer);
    }
    this.client.close();
  }

  // ---- NsWatchHost ----

  recheck(w: NsWatch, waiter: Waiter): void {
    void (async () => {
      let delay = this.reconnectMinMs;
      while (!waiter.done && !w.dead) {
        try {
          const { rec, rev } = await this.lookupAt(w.ns, waiter.upath);
          if (rec !== undefined) waiter.resolve(rec);
          else waiter.after = Math.max(waiter.after, rev);
          return;
        } catch (err) {
          if (waiter.done) return;
          if (!unreachableGiveUp(err)) return waiter.reject(err as DyadError);
          await sleep(delay);
          delay = Math.min(delay * 2, this.reconnectMaxMs);
        }
      }
    })();
  }

  verify(w: NsWatch): void {
    void this.hasNamespace(w.ns).then(
      (exists) => {
        if (!exists && !w.dead) this.ended(w, noNamespace(w.ns));
      },
      () => undefined, // unreachable or closed: the resumed watch or the next request will tell
    );
  }

  ended(w: NsWatch, reason: DyadError): void {
    if (this.watchers.get(w.ns) === w) this.watchers.delete(w.ns);
    this.hub.remove(w);
    if (reason.code === 'DYAD_ENONS') {
      this.metas.delete(w.ns);
      this.registered.delete(w.ns);
    }
    w.shutdown(reason);
  }

  // ---- internals ----

  /** Runs fn, retrying transient etcd failures with backoff until the deadline. */
  private async request<T>(what: string, fn: (o: CallOptions, attempt: number) => Promise<T>, timeoutMs = this.requestTimeoutMs): Promise<T> {
    const deadline = timeoutMs > 0 ? performance.now() + timeoutMs : Infinity;
    let delay = this.reconnectMinMs;
    let refused = false;
    for (let attempt = 1; ; attempt++) {
      this.checkOpen();
      const left = deadline - performance.now();
      try {
        return await fn(left === Infinity ? {} : { deadline: Date.now() + Math.max(1, left) }, attempt);
      } catch (err) {
        if (err instanceof DyadError) throw err;
        if (this.closed) throw closedError('KVS handle');
        // A paged read whose revision was compacted meanwhile starts over.
        const compacted = /required revision has been compacted/.test(err instanceof Error ? err.message : '');
        if (!compacted && !isTransient(err)) throw etcdFailure(this.endpoints, what, err);
        refused ||= isUnreachable(err);
        if (performance.now() + delay >= deadline) throw etcdGaveUp(this.endpoints, what, timeoutMs, err, refused);
        await sleep(delay * (0.5 + Math.random()));
        delay = Math.min(delay * 2, this.reconnectMaxMs);
      }
    }
  }

  private async lookupAt(ns: string, upath: string): Promise<{ rec: FileRecord | undefined; rev: number }> {
    this.checkOpen();
    checkNamespace(ns);
    checkUpath(upath, true);
    this.checkUtf8(upath);
    const L = this.layout;
    return this.request(`lookup of ${JSON.stringify(upath)}`, async (o) => {
      let meta = await this.nsMeta(ns, o);
      for (;;) {
        const ops = [rangeOp(L.meta(ns)), rangeOp(L.dirRecord(ns, upath))];
        if (upath !== '') ops.push(rangeOp(L.file(ns, genPathKey(upath, meta.keyDepth, meta.keyBins))));
        const res = await this.client.kv.txn({ success: ops }, o);
        const metaKv = kvAt(res.responses, 0);
        if (metaKv === undefined) throw this.gone(ns);
        const now = this.adopt(ns, metaKv);
        if (now.keyDepth !== meta.keyDepth || now.keyBins !== meta.keyBins) {
          meta = now;
          continue;
        }
        const rev = Number(res.header.revision);
        // Files are found by their DYAD key; directories by their entry.
        const kv = kvAt(res.responses, 2) ?? kvAt(res.responses, 1);
        return { rec: kv === undefined ? undefined : decodeRecord(kv), rev };
      }
    });
  }

  /** What publish needs from a read of [meta, entry of each path prefix]; remembers the directories seen. */
  private pathState(ns: string, paths: string[], snap: IResponseOp[]): PathState {
    const metaKv = kvAt(snap, 0);
    if (metaKv === undefined) throw this.gone(ns);
    const meta = this.adopt(ns, metaKv);
    const nodes = paths.map((p, i) => {
      const kv = kvAt(snap, i + 1);
      if (kv === undefined) {
        if (i < paths.length - 1) this.forgetDir(ns, p);
        return undefined;
      }
      const kind = decodeRecord(kv).kind;
      if (kind === 'dir') this.knowDir(ns, p, kv.create_revision);
      return { create: kv.create_revision, kind };
    });
    return { meta, metaCreate: metaKv.create_revision, nodes };
  }

  /** The likely state for a new file whose parent directory this client has seen, without reading. */
  private guessPath(ns: string, paths: string[]): PathState | undefined {
    const cached = this.metas.get(ns);
    if (cached === undefined) return undefined;
    const n = paths.length;
    let parent: string | undefined;
    if (n > 1) {
      parent = this.dirs.get(`${ns}\0${paths[n - 2]!}`);
      if (parent === undefined) return undefined;
    }
    const nodes: PathState['nodes'] = paths.map((_, i) => (i < n - 2 ? { create: '', kind: 'dir' } : i === n - 2 ? { create: parent!, kind: 'dir' } : undefined));
    return { meta: cached.meta, metaCreate: cached.createRev, nodes };
  }

  private knowDir(ns: string, dir: string, createRev: string): void {
    if (this.dirs.size >= MAX_KNOWN_DIRS) this.dirs.clear();
    this.dirs.set(`${ns}\0${dir}`, createRev);
  }

  private forgetDir(ns: string, dir: string): void {
    this.dirs.delete(`${ns}\0${dir}`);
  }

  /** The namespace marker, cached (key parameters do not change while a namespace lives). */
  private async nsMeta(ns: string, o: CallOptions): Promise<NsMeta> {
    const cached = this.metas.get(ns);
    if (cached !== undefined) return cached.meta;
    const res = await this.client.kv.range({ key: this.layout.meta(ns) }, o);
    const kv = res.kvs[0];
    if (kv === undefined) throw noNamespace(ns);
    return this.adopt(ns, kv);
  }

  /** Caches the marker read with an operation; a different incarnation replaces the cached one. */
  private adopt(ns: string, kv: IKeyValue): NsMeta {
    const cached = this.metas.get(ns);
    if (cached !== undefined && cached.createRev === kv.create_revision) return cached.meta;
    const meta = decodeMeta(kv);
    checkKeyParams(meta.keyDepth, meta.keyBins, `namespace ${ns} key`);
    this.metas.set(ns, { createRev: kv.create_revision, meta });
    return meta;
  }

  private gone(ns: string): DyadError {
    this.metas.delete(ns);
    return noNamespace(ns);
  }

  /** The rest of a paged range, read at `revision`. */
  private async rest(
    first: { kvs: IKeyValue[]; more: boolean },
    end: Buffer,
    revision: string,
    o: CallOptions,
    keysOnly = false,
  ): Promise<IKeyValue[]> {
    const out = [...first.kvs];
    let more = first.more;
    while (more && out.length > 0) {
      const from = Buffer.concat([out[out.length - 1]!.key, Buffer.from([0])]);
      const page = await this.client.kv.range({ key: from, range_end: end, limit: PAGE, revision, keys_only: keysOnly }, o);
      out.push(...page.kvs);
      more = page.more;
    }
    return out;
  }

  private async putRank(ns: string, info: RankInfo): Promise<number> {
    const L = this.layout;
    return this.request(`registration of rank ${info.rank}`, async (o) => {
      for (;;) {
        await this.nsMeta(ns, o);
        const createRev = this.metas.get(ns)!.createRev;
        const lease = this.rankLeaseTtlSec > 0 ? await this.leaseId() : undefined;
        let res;
        try {
          res = await this.client.kv.txn(
            { compare: [createIs(L.meta(ns), createRev)], success: [putOp(L.rank(ns, info.rank), encodeRank(info), lease)], failure: [rangeOp(L.meta(ns))] },
            o,
          );
        } catch (err) {
          if (!(err instanceof this.lib.EtcdLeaseInvalidError)) throw err;
          this.dropLease();
          continue;
        }
        if (res.succeeded) return Number(res.header.revision);
        const metaKv = kvAt(res.responses, 0);
        if (metaKv === undefined) throw this.gone(ns);
        this.adopt(ns, metaKv);
      }
    });
  }

  /** The lease rank registrations are held under, granted on first use and kept alive by etcd3. */
  private async leaseId(): Promise<string> {
    let lease = this.lease;
    if (lease === undefined) {
      const fresh = this.client.lease(this.rankLeaseTtlSec, { autoKeepAlive: true });
      fresh.on('lost', () => this.leaseLost(fresh));
      this.lease = lease = fresh;
    }
    try {
      return await lease.grant();
    } catch (err) {
      if (this.lease === lease) this.lease = undefined;
      throw err;
    }
  }

  private dropLease(): void {
    const lease = this.lease;
    this.lease = undefined;
    lease?.release();
  }

  /**
   * etcd forgot our lease (we were cut off for longer than its TTL) and with it
   * our registrations: register them again under a new one once etcd is back.
   */
  private leaseLost(lease: Lease): void {
    if (this.closed || this.lease !== lease) return;
    this.lease = undefined;
    if (this.reRegistering || this.registered.size === 0) return;
    this.reRegistering = true;
    void (async () => {
      try {
        let delay = this.reconnectMinMs;
        while (!this.closed) {
          try {
            for (const [ns, ranks] of [...this.registered]) {
              for (const info of [...ranks.values()]) {
                try {
                  await this.putRank(ns, info);
                } catch (err) {
                  if (!isDyadError(err, 'DYAD_ENONS')) throw err;
                  this.registered.delete(ns);
                  break;
                }
              }
            }
            return;
          } catch (err) {
            if (this.closed) return;
            process.emitWarning(`dyad etcd KVS: re-registering ranks after losing the lease failed, retrying: ${err instanceof Error ? err.message : String(err)}`);
            await sleep(delay);
            delay = Math.min(delay * 2, this.reconnectMaxMs);
          }
        }
      } finally {
        this.reRegistering = false;
      }
    })();
  }

  /** The namespace's watcher, created to start at startRev if there is none. */
  private watcherFor(ns: string, startRev: number): NsWatch {
    const w = this.watchers.get(ns);
    if (w !== undefined && !w.dead) {
      clearTimeout(w.linger);
      w.linger = undefined;
      return w;
    }
    const fresh = new NsWatch(this, ns, startRev);
    this.watchers.set(ns, fresh);
    this.hub.add(fresh);
    return fresh;
  }

  /** Checks the namespace exists (DYAD_ENONS otherwise) and returns a watcher covering everything after that check. */
  private async subscribe(ns: string): Promise<NsWatch> {
    this.checkOpen();
    checkNamespace(ns);
    return this.request(`watch of namespace ${JSON.stringify(ns)}`, async (o) => {
      const res = await this.client.kv.range({ key: this.layout.meta(ns), count_only: true }, o);
      if (Number(res.count) === 0) throw this.gone(ns);
      return this.watcherFor(ns, Number(res.header.revision) + 1);
    });
  }

  /** Waits for the watcher to be live (bounded by requestTimeoutMs) and returns the unsubscribe function. */
  private async liveOrDrop(w: NsWatch, remove: () => void): Promise<() => void> {
    const unsubscribe = (): void => {
      remove();
      this.idle(w);
    };
    let timer: NodeJS.Timeout | undefined;
    const limit = this.requestTimeoutMs;
    const timeout =
      limit > 0
        ? new Promise<'timeout'>((r) => {
            timer = setTimeout(() => r('timeout'), limit);
          })
        : new Promise<'timeout'>(() => undefined);
    const outcome = await Promise.race([w.live.then(() => 'live' as const), timeout]);
    clearTimeout(timer);
    if (outcome === 'timeout') {
      unsubscribe();
      throw kvsError('DYAD_ETIMEDOUT', 'ETIMEDOUT', `etcd at ${this.endpoints} did not start the watch of namespace ${JSON.stringify(w.ns)} within ${limit} ms`);
    }
    return unsubscribe;
  }

  /** Ends an unused watcher after watchLingerMs, unless it is used again by then. */
  private idle(w: NsWatch): void {
    if (w.dead || w.users() > 0 || w.linger !== undefined) return;
    w.linger = setTimeout(() => {
      w.linger = undefined;
      if (w.dead || w.users() > 0) return;
      w.dead = true;
      if (this.watchers.get(w.ns) === w) this.watchers.delete(w.ns);
      this.hub.remove(w);
    }, this.watchLingerMs);
    w.linger.unref();
  }

  /** Own changes reach this client's listeners before the change's reply does, as with the other backends. */
  private async barrier(ns: string, rev: number): Promise<void> {
    const w = this.watchers.get(ns);
    if (w === undefined || w.dead || !w.hasListeners()) return;
    await w.barrier(rev, this.requestTimeoutMs > 0 ? this.requestTimeoutMs : 30_000);
  }

  private checkPath(upath: string): void {
    checkUpath(upath);
    this.checkUtf8(upath);
    let parts = 1;
    for (let i = 0; i < upath.length; i++) if (upath.charCodeAt(i) === 0x2f) parts++;
    if (parts > this.maxComponents) {
      throw invalidArgument(
        `invalid KVS path ${JSON.stringify(upath.slice(0, 200))}: more than ${this.maxComponents} components, too many for one etcd transaction (etcd --max-txn-ops)`,
      );
    }
  }

  /** etcd keys are bytes: a lone surrogate would not survive the trip through UTF-8. */
  private checkUtf8(upath: string): void {
    if (/\p{Cs}/u.test(upath)) throw invalidArgument(`invalid KVS path ${JSON.stringify(upath.slice(0, 200))}: not valid Unicode (lone surrogate)`);
  }

  private checkOpen(): void {
    if (this.closed) throw closedError('KVS handle');
  }
}

