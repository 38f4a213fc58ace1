/**
 * The `mem:` backend: a Kvs calling an in-process KvsStore directly, with the
 * embedded server's semantics but no network, persistence or authentication.
 * `mem:` gives a private store; `mem:NAME` shares one store per name within the
 * process, so a test can run a producer and a consumer side by side.
 */
import { ConfigError } from '../errors.js';
import type { DyadError } from '../errors.js';
import { closedError, interrupted, invalidArgument, timedOut } from './errors.js';
import { KvsStore, type StoreOptions, type Waiter } from './embedded/store.js';
import type { DirEntry, FileRecord, KvsWatchEvent, KvsWatchListener, PublishInput, PublishOptions, RankInfo, WaitOptions, WatchableKvs } from './types.js';

const shared = new Map<string, KvsStore>();

export class MemoryKvs implements WatchableKvs {
  private closed = false;
  private readonly waits = new Set<{ cancel(err: DyadError): void }>();
  private readonly watches = new Set<{ ns: string; listener: KvsWatchListener; stop(): void }>();
  /** The upath this handle is publishing with pushed bytes, while the store announces it. */
  private pushing: string | undefined;

  constructor(readonly store: KvsStore = new KvsStore()) {}

  /** A private store when name is empty, else the process-wide store of that name. */
  static open(name: string, opts: StoreOptions = {}): MemoryKvs {
    if (name === '') return new MemoryKvs(new KvsStore(opts));
    let store = shared.get(name);
    if (store === undefined) {
      store = new KvsStore(opts);
      shared.set(name, store);
    } else if (
      (opts.keyDepth !== undefined && opts.keyDepth !== store.keyDepth) ||
      (opts.keyBins !== undefined && opts.keyBins !== store.keyBins)
    ) {
      throw new ConfigError(`mem:${name} already exists with key depth ${store.keyDepth} and bins ${store.keyBins}`);
    }
    return new MemoryKvs(store);
  }

  /** Forgets a shared store (tests). */
  static dropShared(name: string): void {
    shared.delete(name);
  }

  async publish(ns: string, upath: string, rec: PublishInput, opts?: PublishOptions): Promise<FileRecord> {
    this.checkOpen();
    // The store announces the change before its call returns: to this
    // handle's own watchers without the bytes pushed, as the embedded
    // server leaves them out for the session that pushed them.
    if (opts?.content !== undefined) this.pushing = upath;
    try {
      return this.store.publish(ns, upath, rec, opts?.content);
    } finally {
      this.pushing = undefined;
    }
  }

  async lookup(ns: string, upath: string): Promise<FileRecord | undefined> {
    this.checkOpen();
    return this.store.lookup(ns, upath);
  }

  /** The store is in this process: what it holds is known, without a round trip. */
  known(ns: string, upath: string): FileRecord | undefined | null {
    if (this.closed) return null;
    try {
      return this.store.lookup(ns, upath);
    } catch {
      return null; // no such namespace, a bad path: a lookup will say so
    }
  }

  wait(ns: string, upath: string, opts: WaitOptions = {}): Promise<FileRecord> {
    return new Promise<FileRecord>((resolve, reject) => {
      this.checkOpen();
      const what = `KVS wait of ${JSON.stringify(upath)}`;
      const { timeoutMs, signal } = opts;
      if (timeoutMs !== undefined && (!Number.isFinite(timeoutMs) || timeoutMs < 0)) {
        throw invalidArgument(`timeoutMs must be a non-negative number, got ${timeoutMs}`);
      }
      if (signal?.aborted === true) throw interrupted(what);
      let timer: NodeJS.Timeout | undefined;
      const finish = (): void => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        this.waits.delete(handle);
      };
      const waiter: Waiter = {
        resolve: (rec) => {
          finish();
          resolve(rec);
        },
        reject: (err) => {
          finish();
          reject(err);
        },
      };
      const handle = {
        cancel: (err: DyadError): void => {
          this.store.removeWaiter(ns, upath, waiter);
          waiter.reject(err);
        },
      };
      const onAbort = (): void => handle.cancel(interrupted(what));
      const rec = this.store.addWaiter(ns, upath, waiter);
      if (rec !== undefined) {
        resolve(rec);
        return;
      }
      this.waits.add(handle);
      if (timeoutMs !== undefined) timer = setTimeout(() => handle.cancel(timedOut(what, timeoutMs)), timeoutMs);
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  async unpublish(ns: string, upath: string): Promise<boolean> {
    this.checkOpen();
    return this.store.unpublish(ns, upath);
  }

  async list(ns: string, dirUpath: string): Promise<DirEntry[]> {
    this.checkOpen();
    return this.store.list(ns, dirUpath).items;
  }

  async createNamespace(ns: string): Promise<void> {
    this.checkOpen();
    await this.store.createNamespace(ns);
  }

  async removeNamespace(ns: string): Promise<void> {
    this.checkOpen();
    await this.store.removeNamespace(ns);
  }

  async listNamespaces(): Promise<string[]> {
    this.checkOpen();
    return this.store.listNamespaces().items;
  }

  async hasNamespace(ns: string): Promise<boolean> {
    this.checkOpen();
    return this.store.hasNamespace(ns);
  }

  async registerRank(ns: string, info: RankInfo): Promise<void> {
    this.checkOpen();
    await this.store.registerRank(ns, info);
  }

  async lookupRank(ns: string, rank: number): Promise<RankInfo | undefined> {
    this.checkOpen();
    return this.store.lookupRank(ns, rank);
  }

  async listRanks(ns: string): Promise<RankInfo[]> {
    this.checkOpen();
    return this.store.listRanks(ns).items;
  }

  async watch(ns: string, listener: KvsWatchListener): Promise<() => void> {
    this.checkOpen();
    const stop = this.store.watch(ns, (ev) => listener(this.pushing === undefined ? ev : withoutPushed(ev, this.pushing)));
    const w = { ns, listener, stop };
    this.watches.add(w);
    return () => {
      this.watches.delete(w);
      stop();
    };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const err = closedError('KVS handle');
    for (const w of [...this.waits]) w.cancel(err);
    for (const w of [...this.watches]) {
      w.stop();
      w.listener({ type: 'closed', ns: w.ns, reason: err });
    }
    this.watches.clear();
  }

  private checkOpen(): void {
    if (this.closed) throw closedError('KVS handle');
  }
}

/** `ev` without the pushed bytes of `upath`. */
function withoutPushed(ev: KvsWatchEvent, upath: string): KvsWatchEvent {
  if (ev.type !== 'change') return ev;
  return { ...ev, changes: ev.changes.map((c) => (c.upath === upath && c.content !== undefined ? { upath: c.upath, record: c.record } : c)) };
}
