/**
 * CachedKvs: a client-side cache of records and directory listings in front of
 * any Kvs, so repeated lookups (every FUSE lookup/getattr) avoid a round trip.
 *
 * When the backend can push changes (WatchableKvs) the cache subscribes to each
 * namespace it serves and is kept exact by the change events: positive and
 * negative lookups and listings are cached without expiry, bounded by LRU. A
 * reply is cached only if no event for its namespace arrived while it was in
 * flight (an event is at least as new as the reply, and is applied instead), and
 * a 'reset' (connection lost) discards everything learned before it. A backend
 * that cannot push gets the weaker fallback: positive records only, for ttlMs.
 *
 * "Exact" means: the cache reflects every change whose notification has
 * reached this client. A change made elsewhere is applied on the server and
 * pushed to caching clients before its publisher is acknowledged, but a reader
 * told about it through another channel (an MPI barrier, say) may, for the
 * notification's one-way delay, still be answered from the cache. wait() never
 * trusts a cached absence, so "block until published" is unaffected; callers
 * that must not see a stale absence can set cacheNegative: false.
 *
 * The cost of exactness is that every change in a watched namespace is sent to
 * every caching client; see docs/KVS.md.
 */
import { LRUCache } from 'lru-cache';
import { isWatchable, type DirEntry, type FileRecord, type Kvs, type KvsWatchEvent, type PublishInput, type PublishOptions, type RankInfo, type WaitOptions } from './types.js';
import { parentOf } from './upath.js';

export interface CachedKvsOptions {
  /** Records (positive or negative) kept, LRU. Default 100 000. */
  maxRecords?: number;
  /** Directory entries kept across all cached listings, LRU. Default 1 000 000. */
  maxListEntries?: number;
  /** Lifetime of a cached record when the backend cannot push changes. Default 1000 ms. */
  ttlMs?: number;
  /** After a failed subscription, how long to serve that namespace uncached before trying again. Default 1000 ms. */
  rewatchDelayMs?: number;
  /** Cache absences (with a subscription only). Default true. */
  cacheNegative?: boolean;
  /** Cache directory listings (with a subscription only). Default true. */
  cacheLists?: boolean;
  /** Bytes of pushed file content held until a reader takes them, LRU. Default 64 MiB; 0 keeps none. */
  maxPushedBytes?: number;
}

export interface CacheStats {
  hits: number;
  misses: number;
  records: number;
  listings: number;
}

interface RecordEntry {
  rec: FileRecord | undefined;
  gen: number;
  /** Only for records cached without a subscription. */
  expires?: number;
}

interface ListEntry {
  entries: readonly DirEntry[];
  gen: number;
}

interface NsState {
  mode: 'unwatched' | 'starting' | 'live';
  /** Bumped when cached knowledge of the namespace must be dropped; older entries are ignored. */
  gen: number;
  /** Tick of the last event seen for the namespace. */
  lastEvent: number;
  unwatch: (() => void) | undefined;
  retryAt: number;
  /** Settles when the current subscription attempt does. */
  starting: Promise<void> | undefined;
}

function key(ns: string, upath: string): string {
  return `${ns}\0${upath}`;
}

export class CachedKvs implements Kvs {
  private readonly records: LRUCache<string, RecordEntry>;
  private readonly lists: LRUCache<string, ListEntry>;
  private readonly pushed: LRUCache<string, { version: number; content: Uint8Array }> | undefined;
  private readonly states = new Map<string, NsState>();
  private readonly ttlMs: number;
  private readonly rewatchDelayMs: number;
  private readonly canWatch: boolean;
  private readonly cacheNegative: boolean;
  private readonly cacheLists: boolean;
  private tick = 0;
  private hits = 0;
  private misses = 0;
  private closed = false;

  constructor(
    readonly inner: Kvs,
    opts: CachedKvsOptions = {},
  ) {
    this.records = new LRUCache({ max: opts.maxRecords ?? 100_000 });
    this.lists = new LRUCache({ maxSize: opts.maxListEntries ?? 1_000_000, sizeCalculation: (v) => v.entries.length + 1 });
    const maxPushed = opts.maxPushedBytes ?? 64 << 20;
    this.pushed = maxPushed > 0 ? new LRUCache({ maxSize: maxPushed, sizeCalculation: (v) => v.content.byteLength + 64 }) : undefined;
    this.ttlMs = opts.ttlMs ?? 1000;
    this.rewatchDelayMs = opts.rewatchDelayMs ?? 1000;
    this.canWatch = isWatchable(inner);
    this.cacheNegative = opts.cacheNegative ?? true;
    this.cacheLists = opts.cacheLists ?? true;
  }

  /**
   * Subscribes to ns if not yet done and tells whether the cache is exact for it
   * (false: the backend cannot push changes or the subscription failed).
   */
  async watching(ns: string): Promise<boolean> {
    const st = this.state(ns);
    if (st.starting !== undefined) await st.starting;
    return st.mode === 'live';
  }

  stats(): CacheStats {
    return { hits: this.hits, misses: this.misses, records: this.records.size, listings: this.lists.size };
  }

  async lookup(ns: string, upath: string): Promise<FileRecord | undefined> {
    const st = this.state(ns);
    const hit = this.cachedRecord(st, ns, upath, false);
    return hit !== null ? hit : this.lookupFresh(ns, upath);
  }

  async lookupFresh(ns: string, upath: string): Promise<FileRecord | undefined> {
    const st = this.state(ns);
    const t0 = this.tick;
    const mode = st.mode;
    const rec = await this.inner.lookup(ns, upath);
    // A record the store no longer has must not be served from here either
    // (an absence is then remembered as any other, where absences are).
    if (rec === undefined) this.records.delete(key(ns, upath));
    this.remember(st, mode, t0, ns, upath, rec);
    return rec;
  }

  known(ns: string, upath: string): FileRecord | undefined | null {
    // Not counted: the lookup that usually follows counts once.
    const hit = this.cachedRecord(this.state(ns), ns, upath, false, false);
    return hit !== null || !this.inner.known ? hit : this.inner.known(ns, upath);
  }

  async wait(ns: string, upath: string, opts?: WaitOptions): Promise<FileRecord> {
    const st = this.state(ns);
    const hit = this.cachedRecord(st, ns, upath, true);
    if (hit !== null && hit !== undefined) return hit;
    const t0 = this.tick;
    const mode = st.mode;
    const rec = await this.inner.wait(ns, upath, opts);
    this.remember(st, mode, t0, ns, upath, rec);
    return rec;
  }

  async list(ns: string, dirUpath: string): Promise<DirEntry[]> {
    const st = this.state(ns);
    if (st.mode === 'live') {
      const e = this.lists.get(key(ns, dirUpath));
      if (e !== undefined && e.gen === st.gen) {
        this.hits++;
        return [...e.entries];
      }
    }
    this.misses++;
    const t0 = this.tick;
    const live = st.mode === 'live';
    const entries = await this.inner.list(ns, dirUpath);
    if (this.cacheLists && live && st.mode === 'live' && this.fresh(st, t0)) {
      const frozen = entries.map((e) => Object.freeze({ name: e.name, record: Object.freeze(e.record) }));
      this.lists.set(key(ns, dirUpath), { entries: Object.freeze(frozen), gen: st.gen });
      // ls -l stats every entry next; the listing already holds the records.
      for (const e of frozen) this.records.set(key(ns, dirUpath === '' ? e.name : `${dirUpath}/${e.name}`), { rec: e.record, gen: st.gen });
      return [...frozen];
    }
    return entries;
  }

  async publish(ns: string, upath: string, rec: PublishInput, opts?: PublishOptions): Promise<FileRecord> {
    const st = this.state(ns);
    const mode = st.mode;
    const out = await this.inner.publish(ns, upath, rec, opts);
    // Our own change came back with its bytes: nobody here will pull them.
    if (opts?.content !== undefined) this.pushed?.delete(key(ns, upath));
    // With a subscription the change event has already updated the cache.
    if (mode === 'unwatched' && st.mode === 'unwatched') this.records.set(key(ns, upath), { rec: Object.freeze(out), gen: st.gen, expires: performance.now() + this.ttlMs });
    return out;
  }

  async unpublish(ns: string, upath: string): Promise<boolean> {
    const st = this.state(ns);
    const out = await this.inner.unpublish(ns, upath);
    if (st.mode !== 'live') this.records.delete(key(ns, upath));
    return out;
  }

  takePushedContent(ns: string, upath: string, rec: FileRecord): Uint8Array | undefined {
    const k = key(ns, upath);
    const e = this.pushed?.get(k);
    if (e === undefined) return undefined;
    this.pushed!.delete(k);
    return e.version === rec.version ? e.content : undefined;
  }

  createNamespace(ns: string): Promise<void> {
    return this.inner.createNamespace(ns);
  }

  async removeNamespace(ns: string): Promise<void> {
    await this.inner.removeNamespace(ns);
    const st = this.states.get(ns);
    if (st !== undefined) this.forget(st, true);
  }

  listNamespaces(): Promise<string[]> {
    return this.inner.listNamespaces();
  }

  hasNamespace(ns: string): Promise<boolean> {
    return this.inner.hasNamespace(ns);
  }

  registerRank(ns: string, info: RankInfo): Promise<void> {
    return this.inner.registerRank(ns, info);
  }

  lookupRank(ns: string, rank: number): Promise<RankInfo | undefined> {
    return this.inner.lookupRank(ns, rank);
  }

  listRanks(ns: string): Promise<RankInfo[]> {
    return this.inner.listRanks(ns);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const st of this.states.values()) st.unwatch?.();
    this.states.clear();
    this.records.clear();
    this.lists.clear();
    this.pushed?.clear();
    await this.inner.close();
  }

  // ---- internals ----

  /** The cached record, undefined for a cached absence, null for a miss. */
  private cachedRecord(st: NsState, ns: string, upath: string, positiveOnly: boolean, count = true): FileRecord | undefined | null {
    const e = this.records.get(key(ns, upath));
    if (e !== undefined && e.gen === st.gen && (e.rec !== undefined || !positiveOnly)) {
      if (e.expires === undefined ? st.mode === 'live' : e.expires > performance.now()) {
        if (count) this.hits++;
        return e.rec;
      }
    }
    if (count) this.misses++;
    return null;
  }

  /**
   * Caches a reply. `mode` is the namespace's mode when the request was issued: a
   * reply is exact only if the subscription was already live then (the server saw
   * the subscription before the request) and no event arrived since.
   */
  private remember(st: NsState, mode: NsState['mode'], t0: number, ns: string, upath: string, rec: FileRecord | undefined): void {
    if (mode !== st.mode) return;
    if (mode === 'live') {
      if (this.fresh(st, t0) && (rec !== undefined || this.cacheNegative)) {
        this.records.set(key(ns, upath), { rec: rec && Object.freeze(rec), gen: st.gen });
      }
    } else if (mode === 'unwatched' && rec !== undefined) {
      this.records.set(key(ns, upath), { rec: Object.freeze(rec), gen: st.gen, expires: performance.now() + this.ttlMs });
    }
  }

  /** No event (or reset) for the namespace since t0, so a reply sent after t0 is current. */
  private fresh(st: NsState, t0: number): boolean {
    return st.lastEvent <= t0;
  }

  private state(ns: string): NsState {
    let st = this.states.get(ns);
    if (st === undefined) {
      st = { mode: 'unwatched', gen: 0, lastEvent: 0, unwatch: undefined, retryAt: 0, starting: undefined };
      this.states.set(ns, st);
    }
    if (st.mode === 'unwatched' && this.canWatch && !this.closed && performance.now() >= st.retryAt) this.startWatch(ns, st);
    return st;
  }

  private startWatch(ns: string, st: NsState): void {
    if (!isWatchable(this.inner)) return;
    st.mode = 'starting';
    // Records cached with a TTL are not exact; events from now on are.
    st.gen++;
    st.lastEvent = ++this.tick;
    st.starting = this.inner.watch(ns, (ev) => this.onEvent(st, ns, ev)).then(
      (unwatch) => {
        st.starting = undefined;
        if (this.closed || st.mode !== 'starting') {
          unwatch();
          return;
        }
        st.unwatch = unwatch;
        st.mode = 'live';
      },
      () => {
        st.starting = undefined;
        if (st.mode === 'starting') {
          st.mode = 'unwatched';
          st.retryAt = performance.now() + this.rewatchDelayMs;
        }
      },
    );
  }

  private onEvent(st: NsState, ns: string, ev: KvsWatchEvent): void {
    st.lastEvent = ++this.tick;
    if (ev.type === 'change') {
      for (const c of ev.changes) {
        if (c.record !== undefined || this.cacheNegative) {
          this.records.set(key(ns, c.upath), { rec: c.record && Object.freeze(c.record), gen: st.gen });
        } else {
          this.records.delete(key(ns, c.upath));
        }
        if (c.content !== undefined && c.record !== undefined) this.pushed?.set(key(ns, c.upath), { version: c.record.version, content: c.content });
        else this.pushed?.delete(key(ns, c.upath));
        // A changed entry alters its parent's listing; a changed directory record means its entries changed.
        this.lists.delete(key(ns, c.upath));
        if (c.upath !== '') this.lists.delete(key(ns, parentOf(c.upath)));
      }
    } else {
      this.forget(st, ev.type === 'closed');
    }
  }

  /** Drops what is cached for the namespace; `ended` also drops the subscription. */
  private forget(st: NsState, ended: boolean): void {
    st.gen++;
    st.lastEvent = ++this.tick;
    if (ended) {
      st.unwatch?.();
      st.unwatch = undefined;
      st.mode = 'unwatched';
      st.retryAt = performance.now() + this.rewatchDelayMs;
    }
  }
}
