/**
 * The embedded KVS engine: every namespace held in memory as a tree of upaths,
 * files also indexed by their DYAD key, plus waiters, watchers and the rank
 * registry. The TCP server and the in-process `mem:` backend are thin shells over
 * it, so both have exactly the same semantics.
 *
 * Changes become visible (lookups, waiter wake-ups, watch events) as soon as they
 * are applied; the promise a mutation returns settles only once its journal entry
 * is durable. So a crash can lose only unacknowledged changes, and consumers are
 * woken without waiting for an fsync. The journal sees entries in apply order
 * because application and the append call happen in the same synchronous step.
 */
import type { DyadError } from '../../errors.js';
import { invalidArgument, kvsError, noNamespace } from '../errors.js';
import { genPathKey, checkKeyParams, DEFAULT_KEY_BINS, DEFAULT_KEY_DEPTH } from '../key.js';
import type { DirEntry, FileRecord, KvsChange, KvsWatchListener, KvsWatchEvent, PublishInput, RankInfo } from '../types.js';
import { checkUpath, joinUpath } from '../upath.js';
import { checkNamespace, checkPublishInput, checkRank, checkRankInfo } from '../validate.js';
import { generateSecret, parseSecret } from './secrets.js';

/** st_mode of the implicit directories: S_IFDIR | 0755. */
export const DIR_MODE = 0o040755;

interface FileNode {
  kind: 'file';
  name: string;
  rec: FileRecord;
}

interface DirNode {
  kind: 'dir';
  name: string;
  upath: string;
  rec: FileRecord;
  children: Map<string, FileNode | DirNode>;
  /** Sorted child names, rebuilt lazily after the entry set changes (for paged listing). */
  sorted: string[] | undefined;
}

export interface Waiter {
  resolve(rec: FileRecord): void;
  reject(err: DyadError): void;
}

interface Namespace {
  name: string;
  secret: string;
  rev: number;
  createdMs: number;
  root: DirNode;
  /** Files by DYAD key, as DYAD stores them. */
  files: Map<string, FileNode>;
  ranks: Map<number, RankInfo>;
  waiters: Map<string, Set<Waiter>>;
  watchers: Set<KvsWatchListener>;
}

/** Journal vocabulary. Snapshots use 'ns' (with root), 'dir', 'file' and 'rank'. */
export type JournalEntry =
  | { o: 'ns'; ns: string; secret: string; rev: number; t: number; root?: FileRecord }
  | { o: 'ns-'; ns: string }
  | { o: 'pub'; ns: string; p: string; r: FileRecord; t: number }
  | { o: 'unp'; ns: string; p: string; rev: number; t: number }
  | { o: 'dir'; ns: string; p: string; r: FileRecord }
  | { o: 'file'; ns: string; p: string; r: FileRecord }
  | { o: 'rank'; ns: string; info: RankInfo };

export interface StorePersistence {
  /** Called in apply order; resolves once the entry is durable. */
  append(entry: JournalEntry): Promise<void>;
  /** Set once persistence has failed for good; mutations are then refused. */
  readonly failure: DyadError | undefined;
}

export interface StoreOptions {
  keyDepth?: number;
  keyBins?: number;
  now?: () => number;
}

export interface ListPage<T> {
  items: T[];
  more: boolean;
}

function dirRecord(version: number, mtimeMs: number): FileRecord {
  return Object.freeze({ owner: -1, size: 0, mode: DIR_MODE, mtimeMs, digest: '', version, kind: 'dir' });
}

function newDir(name: string, upath: string, rec: FileRecord): DirNode {
  return { kind: 'dir', name, upath, rec, children: new Map(), sorted: undefined };
}

function corrupt(entry: unknown, why: string): DyadError {
  const shown = JSON.stringify(entry)?.slice(0, 300) ?? String(entry);
  return kvsError('DYAD_EIO', 'EIO', `KVS journal entry ${shown} cannot be replayed: ${why}`);
}

function report(what: string, err: unknown): void {
  process.emitWarning(`dyad KVS ${what} threw: ${err instanceof Error ? err.message : String(err)}`);
}

export class KvsStore {
  readonly keyDepth: number;
  readonly keyBins: number;
  private readonly now: () => number;
  private readonly spaces = new Map<string, Namespace>();
  private persistence: StorePersistence | undefined;
  private readonly removedListeners = new Set<(ns: string) => void>();

  constructor(opts: StoreOptions = {}) {
    this.keyDepth = opts.keyDepth ?? DEFAULT_KEY_DEPTH;
    this.keyBins = opts.keyBins ?? DEFAULT_KEY_BINS;
    checkKeyParams(this.keyDepth, this.keyBins);
    this.now = opts.now ?? Date.now;
  }

  /** Route future mutations through persistence (after replaying the journal). */
  attach(persistence: StorePersistence): void {
    this.persistence = persistence;
  }

  keyOf(upath: string): string {
    return genPathKey(upath, this.keyDepth, this.keyBins);
  }

  // ---- namespaces ----

  hasNamespace(ns: string): boolean {
    checkNamespace(ns);
    return this.spaces.has(ns);
  }

  listNamespaces(after?: string, limit = Infinity): ListPage<string> {
    const names = [...this.spaces.keys()].sort();
    return page(names, after === undefined ? 0 : upperBound(names, after), limit, (n) => n);
  }

  namespaceSecret(ns: string): string {
    return this.space(ns).secret;
  }

  async createNamespace(ns: string, secret: string = generateSecret()): Promise<string> {
    checkNamespace(ns);
    secret = parseSecret(secret, 'the namespace secret');
    this.checkWritable();
    if (this.spaces.has(ns)) throw kvsError('DYAD_EEXIST', 'EEXIST', `KVS namespace ${JSON.stringify(ns)} already exists`);
    const t = this.now();
    this.spaces.set(ns, this.makeSpace(ns, secret, 0, t, dirRecord(0, t)));
    await this.persist({ o: 'ns', ns, secret, rev: 0, t });
    return secret;
  }

  async removeNamespace(ns: string): Promise<void> {
    const space = this.space(ns);
    this.checkWritable();
    this.dropSpace(space);
    await this.persist({ o: 'ns-', ns });
  }

  /** Told after a namespace is removed (the server revokes grants on it). */
  onNamespaceRemoved(fn: (ns: string) => void): () => void {
    this.removedListeners.add(fn);
    return () => this.removedListeners.delete(fn);
  }

  // ---- records ----

  lookup(ns: string, upath: string): FileRecord | undefined {
    const space = this.space(ns);
    checkUpath(upath, true);
    return this.find(space, upath)?.rec;
  }

  /** Entries after `after` (by name), at most `limit` of them. */
  list(ns: string, dirUpath: string, after?: string, limit = Infinity): ListPage<DirEntry> {
    const space = this.space(ns);
    checkUpath(dirUpath, true);
    const node = this.find(space, dirUpath);
    if (node === undefined) {
      throw kvsError('DYAD_ENOENT', 'ENOENT', `KVS directory ${JSON.stringify(dirUpath)} does not exist in namespace ${JSON.stringify(ns)}`);
    }
    if (node.kind !== 'dir') {
      throw kvsError('DYAD_ENOTDIR', 'ENOTDIR', `KVS path ${JSON.stringify(dirUpath)} in namespace ${JSON.stringify(ns)} is a file`);
    }
    const names = (node.sorted ??= [...node.children.keys()].sort());
    return page(names, after === undefined ? 0 : upperBound(names, after), limit, (name) => ({
      name,
      record: node.children.get(name)!.rec,
    }));
  }

  /** `content`: bytes pushed to watchers with the change, never stored. */
  async publish(ns: string, upath: string, input: PublishInput, content?: Uint8Array): Promise<FileRecord> {
    const space = this.space(ns);
    checkUpath(upath);
    const clean = checkPublishInput(input);
    this.checkWritable();
    this.checkPublishable(space, upath);
    const rev = ++space.rev;
    const rec: FileRecord = Object.freeze({ ...clean, version: rev, kind: 'file' });
    const t = this.now();
    const changes = this.applyPublish(space, upath, rec, t);
    if (content !== undefined) {
      const own = changes.findIndex((c) => c.upath === upath);
      if (own >= 0) changes[own] = { upath, record: rec, content };
    }
    this.announce(space, rev, changes);
    // Only paths that came into existence can have waiters.
    for (const c of changes) if (c.record !== undefined) this.wake(space, c.upath, c.record);
    await this.persist({ o: 'pub', ns, p: upath, r: rec, t });
    return rec;
  }

  async unpublish(ns: string, upath: string): Promise<boolean> {
    const space = this.space(ns);
    checkUpath(upath);
    this.checkWritable();
    const node = this.find(space, upath);
    if (node === undefined) return false;
    if (node.kind === 'dir') {
      throw kvsError('DYAD_EISDIR', 'EISDIR', `KVS path ${JSON.stringify(upath)} in namespace ${JSON.stringify(ns)} is a directory`);
    }
    const rev = ++space.rev;
    const t = this.now();
    const changes = this.applyUnpublish(space, upath, rev, t);
    this.announce(space, rev, changes);
    await this.persist({ o: 'unp', ns, p: upath, rev, t });
    return true;
  }

  /** Returns the record if upath exists now (the waiter is not kept), else keeps the waiter. */
  addWaiter(ns: string, upath: string, waiter: Waiter): FileRecord | undefined {
    const space = this.space(ns);
    checkUpath(upath, true);
    const rec = this.find(space, upath)?.rec;
    if (rec !== undefined) return rec;
    let set = space.waiters.get(upath);
    if (set === undefined) space.waiters.set(upath, (set = new Set()));
    set.add(waiter);
    return undefined;
  }

  removeWaiter(ns: string, upath: string, waiter: Waiter): void {
    const space = this.spaces.get(ns);
    const set = space?.waiters.get(upath);
    if (set === undefined) return;
    set.delete(waiter);
    if (set.size === 0) space!.waiters.delete(upath);
  }

  /** Synchronous change events for ns until the returned function is called or ns is removed. */
  watch(ns: string, listener: KvsWatchListener): () => void {
    const space = this.space(ns);
    space.watchers.add(listener);
    return () => space.watchers.delete(listener);
  }

  // ---- ranks ----

  async registerRank(ns: string, info: RankInfo): Promise<void> {
    const space = this.space(ns);
    const clean = deepFreeze(checkRankInfo(info));
    this.checkWritable();
    space.ranks.set(clean.rank, clean);
    await this.persist({ o: 'rank', ns, info: clean });
  }

  /**
   * Forgets a rank whose daemon stopped renewing it (see the server's rank
   * leases). In memory only: after a restart every rank gets a fresh lease.
   */
  dropRank(ns: string, rank: number): boolean {
    if (!this.hasNamespace(ns)) return false;
    return this.space(ns).ranks.delete(rank);
  }

  /** Every registered rank, for lease bookkeeping. */
  *allRanks(): Generator<{ ns: string; rank: number }> {
    for (const ns of this.listNamespaces().items) for (const info of this.listRanks(ns).items) yield { ns, rank: info.rank };
  }

  lookupRank(ns: string, rank: number): RankInfo | undefined {
    const space = this.space(ns);
    checkRank(rank);
    return space.ranks.get(rank);
  }

  listRanks(ns: string, after?: number, limit = Infinity): ListPage<RankInfo> {
    const space = this.space(ns);
    const ranks = [...space.ranks.keys()].sort((a, b) => a - b);
    let start = 0;
    if (after !== undefined) while (start < ranks.length && ranks[start]! <= after) start++;
    return page(ranks, start, limit, (r) => space.ranks.get(r)!);
  }

  // ---- persistence ----

  /** Re-applies one journal entry (startup). Throws DYAD_EIO on entries that do not fit. */
  replay(value: unknown): void {
    const e = value as Partial<Record<string, unknown>>;
    if (typeof e !== 'object' || e === null || typeof e['o'] !== 'string' || typeof e['ns'] !== 'string') {
      throw corrupt(value, 'not an entry');
    }
    const ns = e['ns'];
    if (e['o'] === 'ns') {
      const rev = e['rev'];
      const t = e['t'];
      const secret = e['secret'];
      if (typeof rev !== 'number' || typeof t !== 'number' || typeof secret !== 'string') throw corrupt(value, 'bad namespace entry');
      const old = this.spaces.get(ns);
      if (old !== undefined) this.dropSpace(old);
      const root = e['root'] === undefined ? dirRecord(rev, t) : Object.freeze(storedRecord(value, e['root']));
      this.spaces.set(ns, this.makeSpace(ns, secret, rev, t, root));
      return;
    }
    const space = this.spaces.get(ns);
    if (space === undefined) throw corrupt(value, 'unknown namespace');
    try {
      switch (e['o']) {
        case 'ns-':
          this.dropSpace(space);
          return;
        case 'pub': {
          const r = Object.freeze(storedRecord(value, e['r']));
          checkUpath(e['p']);
          this.checkPublishable(space, e['p']);
          space.rev = Math.max(space.rev, r.version);
          this.applyPublish(space, e['p'], r, Number(e['t']));
          return;
        }
        case 'unp': {
          checkUpath(e['p']);
          if (this.find(space, e['p'])?.kind !== 'file') throw corrupt(value, 'no such file');
          const rev = Number(e['rev']);
          space.rev = Math.max(space.rev, rev);
          this.applyUnpublish(space, e['p'], rev, Number(e['t']));
          return;
        }
        case 'dir':
        case 'file': {
          checkUpath(e['p']);
          this.restoreNode(space, e['p'], Object.freeze(storedRecord(value, e['r'])));
          return;
        }
        case 'rank': {
          const info = deepFreeze(checkRankInfo(e['info']));
          space.ranks.set(info.rank, info);
          return;
        }
        default:
          throw corrupt(value, 'unknown operation');
      }
    } catch (err) {
      if ((err as DyadError).code === 'DYAD_EIO') throw err;
      throw corrupt(value, err instanceof Error ? err.message : String(err));
    }
  }

  /** The whole state as journal entries, parents before children (for compaction). */
  *snapshot(): Generator<JournalEntry> {
    for (const space of this.spaces.values()) {
      const ns = space.name;
      yield { o: 'ns', ns, secret: space.secret, rev: space.rev, t: space.createdMs, root: space.root.rec };
      const stack: DirNode[] = [space.root];
      while (stack.length > 0) {
        const dir = stack.pop()!;
        for (const child of dir.children.values()) {
          const p = joinUpath(dir.upath, child.name);
          if (child.kind === 'dir') {
            yield { o: 'dir', ns, p, r: child.rec };
            stack.push(child);
          } else {
            yield { o: 'file', ns, p, r: child.rec };
          }
        }
      }
      for (const info of space.ranks.values()) yield { o: 'rank', ns, info };
    }
  }

  // ---- internals ----

  private space(ns: string): Namespace {
    checkNamespace(ns);
    const space = this.spaces.get(ns);
    if (space === undefined) throw noNamespace(ns);
    return space;
  }

  private makeSpace(name: string, secret: string, rev: number, t: number, rootRec: FileRecord): Namespace {
    return {
      name,
      secret,
      rev,
      createdMs: t,
      root: newDir('', '', rootRec),
      files: new Map(),
      ranks: new Map(),
      waiters: new Map(),
      watchers: new Set(),
    };
  }

  private dropSpace(space: Namespace): void {
    this.spaces.delete(space.name);
    const reason = noNamespace(space.name);
    const waiters = [...space.waiters.values()];
    space.waiters.clear();
    for (const set of waiters) for (const w of set) safely('waiter', () => w.reject(reason));
    const watchers = [...space.watchers];
    space.watchers.clear();
    const event: KvsWatchEvent = { type: 'closed', ns: space.name, reason };
    for (const l of watchers) safely('watch listener', () => l(event));
    for (const fn of [...this.removedListeners]) safely('namespace listener', () => fn(space.name));
  }

  private checkWritable(): void {
    const failure = this.persistence?.failure;
    if (failure !== undefined) throw failure;
  }

  private persist(entry: JournalEntry): Promise<void> {
    return this.persistence === undefined ? Promise.resolve() : this.persistence.append(entry);
  }

  private find(space: Namespace, upath: string): FileNode | DirNode | undefined {
    if (upath === '') return space.root;
    const file = space.files.get(this.keyOf(upath));
    if (file !== undefined) return file;
    let node: FileNode | DirNode | undefined = space.root;
    for (const part of upath.split('/')) {
      if (node.kind !== 'dir') return undefined;
      node = node.children.get(part);
      if (node === undefined) return undefined;
    }
    return node;
  }

  /** Throws unless publishing a file at upath fits the current tree. */
  private checkPublishable(space: Namespace, upath: string): void {
    const parts = upath.split('/');
    let dir: DirNode = space.root;
    for (let i = 0; i < parts.length; i++) {
      const child = dir.children.get(parts[i]!);
      if (child === undefined) return;
      const last = i === parts.length - 1;
      if (last && child.kind === 'dir') {
        throw kvsError('DYAD_EISDIR', 'EISDIR', `cannot publish ${JSON.stringify(upath)} in namespace ${JSON.stringify(space.name)}: it is a directory`);
      }
      if (!last && child.kind === 'file') {
        const blocker = parts.slice(0, i + 1).join('/');
        throw kvsError(
          'DYAD_ENOTDIR',
          'ENOTDIR',
          `cannot publish ${JSON.stringify(upath)} in namespace ${JSON.stringify(space.name)}: ${JSON.stringify(blocker)} is a file`,
        );
      }
      if (child.kind === 'dir') dir = child;
    }
  }

  /** Applies a checked publication; returns what changed, in tree order. */
  private applyPublish(space: Namespace, upath: string, rec: FileRecord, t: number): KvsChange[] {
    const changed = new Map<string, FileRecord | undefined>();
    const parts = upath.split('/');
    let dir = space.root;
    for (let i = 0; i < parts.length - 1; i++) {
      const name = parts[i]!;
      let next = dir.children.get(name);
      if (next === undefined) {
        const d = newDir(name, joinUpath(dir.upath, name), dirRecord(rec.version, t));
        this.addEntry(dir, d, rec.version, t, changed);
        changed.set(d.upath, d.rec);
        next = d;
      }
      if (next.kind !== 'dir') throw invalidArgument(`${JSON.stringify(upath)}: a parent is a file`);
      dir = next;
    }
    const name = parts[parts.length - 1]!;
    const existing = dir.children.get(name);
    if (existing === undefined) {
      const node: FileNode = { kind: 'file', name, rec };
      this.addEntry(dir, node, rec.version, t, changed);
      space.files.set(this.keyOf(upath), node);
    } else if (existing.kind === 'file') {
      existing.rec = rec;
    } else {
      throw invalidArgument(`${JSON.stringify(upath)} is a directory`);
    }
    changed.set(upath, rec);
    return [...changed].map(([p, r]) => ({ upath: p, record: r }));
  }

  private applyUnpublish(space: Namespace, upath: string, rev: number, t: number): KvsChange[] {
    const changed = new Map<string, FileRecord | undefined>();
    const parts = upath.split('/');
    const chain: DirNode[] = [space.root];
    for (let i = 0; i < parts.length - 1; i++) chain.push(chain[i]!.children.get(parts[i]!) as DirNode);
    chain[chain.length - 1]!.children.delete(parts[parts.length - 1]!);
    space.files.delete(this.keyOf(upath));
    changed.set(upath, undefined);
    // Directories exist only while they hold something: drop emptied ones upwards.
    for (let i = chain.length - 1; i >= 0; i--) {
      const d = chain[i]!;
      d.sorted = undefined;
      if (i > 0 && d.children.size === 0) {
        chain[i - 1]!.children.delete(d.name);
        changed.set(d.upath, undefined);
        continue;
      }
      d.rec = dirRecord(rev, t);
      changed.set(d.upath, d.rec);
      break;
    }
    return [...changed].map(([p, r]) => ({ upath: p, record: r }));
  }

  private addEntry(dir: DirNode, child: FileNode | DirNode, rev: number, t: number, changed: Map<string, FileRecord | undefined>): void {
    dir.children.set(child.name, child);
    dir.sorted = undefined;
    dir.rec = dirRecord(rev, t);
    changed.set(dir.upath, dir.rec);
  }

  private restoreNode(space: Namespace, upath: string, rec: FileRecord): void {
    const parts = upath.split('/');
    let dir = space.root;
    for (let i = 0; i < parts.length - 1; i++) {
      const next = dir.children.get(parts[i]!);
      if (next === undefined || next.kind !== 'dir') throw new Error('parent directory missing');
      dir = next;
    }
    const name = parts[parts.length - 1]!;
    if (dir.children.has(name)) throw new Error('duplicate path');
    if (rec.kind === 'dir') {
      dir.children.set(name, newDir(name, upath, rec));
    } else {
      const node: FileNode = { kind: 'file', name, rec };
      dir.children.set(name, node);
      space.files.set(this.keyOf(upath), node);
    }
    dir.sorted = undefined;
    space.rev = Math.max(space.rev, rec.version);
  }

  private wake(space: Namespace, upath: string, rec: FileRecord): void {
    const set = space.waiters.get(upath);
    if (set === undefined) return;
    space.waiters.delete(upath);
    for (const w of set) safely('waiter', () => w.resolve(rec));
  }

  private announce(space: Namespace, rev: number, changes: KvsChange[]): void {
    if (space.watchers.size === 0) return;
    const event: KvsWatchEvent = { type: 'change', ns: space.name, rev, changes: Object.freeze(changes) as KvsChange[] };
    for (const l of [...space.watchers]) safely('watch listener', () => l(event));
  }
}

function safely(what: string, fn: () => void): void {
  try {
    fn();
  } catch (err) {
    report(what, err);
  }
}

function storedRecord(entry: unknown, r: unknown): FileRecord {
  const o = r as Partial<Record<keyof FileRecord, unknown>> | null;
  if (
    typeof o !== 'object' ||
    o === null ||
    typeof o.owner !== 'number' ||
    typeof o.size !== 'number' ||
    typeof o.mode !== 'number' ||
    typeof o.mtimeMs !== 'number' ||
    typeof o.digest !== 'string' ||
    typeof o.version !== 'number' ||
    (o.kind !== 'file' && o.kind !== 'dir')
  ) {
    throw corrupt(entry, 'bad record');
  }
  return { owner: o.owner, size: o.size, mode: o.mode, mtimeMs: o.mtimeMs, digest: o.digest, version: o.version, kind: o.kind };
}

function deepFreeze(info: RankInfo): RankInfo {
  if (info.meta !== undefined) Object.freeze(info.meta);
  return Object.freeze(info);
}

/** Index of the first name greater than `after` in a sorted array. */
function upperBound(sorted: readonly string[], after: string): number {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (sorted[mid]! <= after) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function page<K, T>(keys: readonly K[], start: number, limit: number, map: (k: K) => T): ListPage<T> {
  const end = Math.min(keys.length, start + limit);
  const items: T[] = [];
  for (let i = start; i < end; i++) items.push(map(keys[i]!));
  return { items, more: end < keys.length };
}
