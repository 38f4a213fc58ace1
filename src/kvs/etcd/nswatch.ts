/**
 * The per-namespace watcher of the etcd backend: one etcd prefix watch that
 * serves the namespace's pending waits, its watch() listeners and its rank
 * listeners, translating each etcd revision into the KvsWatchEvent the other
 * backends send for the same operation (same paths, same order).
 */
import type { IEvent } from 'etcd3';
import type { DyadError } from '../../errors.js';
import { isDyadError, kvsError, noNamespace } from '../errors.js';
import type { FileRecord, KvsChange, KvsWatchEvent, KvsWatchListener, RankInfo } from '../types.js';
import { decodeRank, decodeRecord, type EtcdLayout } from './layout.js';
import type { WatchTarget } from './watch.js';

export type RankEvent =
  /** A rank was registered or re-registered. */
  | { type: 'registered'; ns: string; rev: number; info: RankInfo }
  /** Its registration went away: its lease expired (the daemon died) or was revoked (it closed). */
  | { type: 'removed'; ns: string; rev: number; rank: number }
  /** Events may have been missed (etcd compacted the history we needed): re-read with listRanks(). */
  | { type: 'reset'; ns: string }
  | { type: 'closed'; ns: string; reason: Error };

export type RankListener = (event: RankEvent) => void;

export interface Waiter {
  readonly upath: string;
  /** Revision of the read that found nothing: older events describe a state already superseded. */
  after: number;
  done: boolean;
  resolve(rec: FileRecord): void;
  reject(err: DyadError): void;
}

export interface NsWatchHost {
  readonly layout: EtcdLayout;
  /** Looks upath up again for a waiter that may have missed its event. */
  recheck(w: NsWatch, waiter: Waiter): void;
  /** Checks the namespace still exists (after history was lost), ending the watcher if not. */
  verify(w: NsWatch): void;
  /** The watcher is finished (namespace gone, or etcd refused it). */
  ended(w: NsWatch, reason: DyadError): void;
}

function safely(what: string, fn: () => void): void {
  try {
    fn();
  } catch (err) {
    process.emitWarning(`dyad etcd KVS ${what} threw: ${err instanceof Error ? err.message : String(err)}`);
  }
}

function depth(upath: string): number {
  if (upath === '') return 0;
  let n = 1;
  for (let i = 0; i < upath.length; i++) if (upath.charCodeAt(i) === 0x2f) n++;
  return n;
}

export class NsWatch implements WatchTarget {
  readonly key: Buffer;
  readonly end: Buffer;
  readonly waiters = new Map<string, Set<Waiter>>();
  readonly listeners = new Set<KvsWatchListener>();
  readonly rankListeners = new Set<RankListener>();
  private barriers: Array<{ rev: number; done(): void }> = [];
  /** Settles once the watcher exists on the server, or has ended. */
  readonly live: Promise<void>;
  private markLive!: () => void;
  dead = false;
  linger: NodeJS.Timeout | undefined;

  constructor(
    private readonly host: NsWatchHost,
    readonly ns: string,
    public nextRev: number,
  ) {
    const r = host.layout.nsRange(ns);
    this.key = r.key;
    this.end = r.end;
    this.live = new Promise((resolve) => (this.markLive = resolve));
  }

  users(): number {
    return this.waiters.size + this.listeners.size + this.rankListeners.size + this.barriers.length;
  }

  /** Whether someone outside this client's own requests is told about changes. */
  hasListeners(): boolean {
    return this.listeners.size + this.rankListeners.size > 0;
  }

  addWaiter(w: Waiter): void {
    let set = this.waiters.get(w.upath);
    if (set === undefined) this.waiters.set(w.upath, (set = new Set()));
    set.add(w);
  }

  removeWaiter(w: Waiter): void {
    const set = this.waiters.get(w.upath);
    if (set === undefined) return;
    set.delete(w);
    if (set.size === 0) this.waiters.delete(w.upath);
  }

  /** Resolves once every event up to rev has been delivered (or the watcher ended, or timeoutMs passed). */
  barrier(rev: number, timeoutMs: number): Promise<void> {
    if (this.dead || this.nextRev > rev) return Promise.resolve();
    return new Promise((resolve) => {
      const b = {
        rev,
        done: () => {
          clearTimeout(timer);
          resolve();
        },
      };
      const timer = setTimeout(() => {
        this.barriers = this.barriers.filter((x) => x !== b);
        resolve();
      }, timeoutMs);
      this.barriers.push(b);
    });
  }

  onCreated(): void {
    this.markLive();
  }

  onProgress(): void {
    this.settleBarriers();
  }

  onRevision(rev: number, events: IEvent[]): void {
    const { layout } = this.host;
    const changes: KvsChange[] = [];
    const ranks: RankEvent[] = [];
    let unpublish = false;
    let removed = false;
    let damaged = false;
    for (const ev of events) {
      const c = layout.classify(this.ns, ev.kv.key);
      const put = ev.type === 'Put';
      try {
        switch (c.kind) {
          case 'meta':
            if (!put) removed = true;
            break;
          case 'root':
            if (put) changes.push({ upath: '', record: decodeRecord(ev.kv) });
            break;
          case 'entry':
            changes.push({ upath: c.upath, record: put ? decodeRecord(ev.kv) : undefined });
            break;
          case 'file':
            if (!put) unpublish = true;
            break;
          case 'rank':
            ranks.push(put ? { type: 'registered', ns: this.ns, rev, info: decodeRank(ev.kv) } : { type: 'removed', ns: this.ns, rev, rank: c.rank });
            break;
          default:
            break;
        }
      } catch (err) {
        damaged = true;
        process.emitWarning(`dyad etcd KVS: ignoring a change in namespace ${this.ns}: ${isDyadError(err) ? err.message : String(err)}`);
      }
    }
    if (removed) {
      this.host.ended(this, noNamespace(this.ns));
      return;
    }
    // Tree order, as the other backends report: top-down for a publication, bottom-up for a removal.
    changes.sort(unpublish ? (a, b) => depth(b.upath) - depth(a.upath) : (a, b) => depth(a.upath) - depth(b.upath));
    if (damaged) this.reset();
    if (changes.length > 0) {
      if (this.listeners.size > 0) {
        const event: KvsWatchEvent = { type: 'change', ns: this.ns, rev, changes };
        for (const l of [...this.listeners]) safely('watch listener', () => l(event));
      }
      for (const c of changes) {
        if (c.record === undefined) continue;
        const set = this.waiters.get(c.upath);
        if (set === undefined) continue;
        const rec = c.record;
        for (const w of [...set]) {
          if (w.after >= rev) continue;
          set.delete(w);
          safely('waiter', () => w.resolve(rec));
        }
        if (set.size === 0) this.waiters.delete(c.upath);
      }
    }
    for (const ev of ranks) for (const l of [...this.rankListeners]) safely('rank listener', () => l(ev));
    this.settleBarriers();
  }

  onCompacted(): void {
    this.reset();
    this.host.verify(this);
    for (const set of [...this.waiters.values()]) for (const w of [...set]) this.host.recheck(this, w);
  }

  onCancelled(reason: string): void {
    this.host.ended(this, kvsError('DYAD_EIO', 'EIO', `etcd cancelled the watch of KVS namespace ${JSON.stringify(this.ns)}: ${reason}`));
  }

  /** Listeners must forget what they learned; pending own-write barriers cannot be met exactly any more. */
  private reset(): void {
    const ev: KvsWatchEvent = { type: 'reset', ns: this.ns };
    for (const l of [...this.listeners]) safely('watch listener', () => l(ev));
    const rev: RankEvent = { type: 'reset', ns: this.ns };
    for (const l of [...this.rankListeners]) safely('rank listener', () => l(rev));
    const bs = this.barriers;
    this.barriers = [];
    for (const b of bs) b.done();
  }

  /** Ends everything waiting here with `reason`. */
  shutdown(reason: DyadError): void {
    if (this.dead) return;
    this.dead = true;
    clearTimeout(this.linger);
    this.markLive();
    const waiters = [...this.waiters.values()];
    this.waiters.clear();
    for (const set of waiters) for (const w of set) safely('waiter', () => w.reject(reason));
    const ev: KvsWatchEvent = { type: 'closed', ns: this.ns, reason };
    for (const l of [...this.listeners]) safely('watch listener', () => l(ev));
    this.listeners.clear();
    const rev: RankEvent = { type: 'closed', ns: this.ns, reason };
    for (const l of [...this.rankListeners]) safely('rank listener', () => l(rev));
    this.rankListeners.clear();
    const bs = this.barriers;
    this.barriers = [];
    for (const b of bs) b.done();
  }

  private settleBarriers(): void {
    if (this.barriers.length === 0) return;
    const keep: typeof this.barriers = [];
    const done: typeof this.barriers = [];
    for (const b of this.barriers) (b.rev < this.nextRev ? done : keep).push(b);
    this.barriers = keep;
    for (const b of done) b.done();
  }
}
