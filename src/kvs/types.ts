/**
 * The metadata interface every KVS backend implements (in-process store, embedded
 * TCP server, later etcd). It is written in upaths, never in DYAD keys: deriving
 * the key is the backend's business, so callers cannot disagree about key depth
 * or bins.
 */

export interface FileRecord {
  /** Owner rank; -1 for directories, which have no single owner. */
  owner: number;
  size: number;
  mode: number;
  mtimeMs: number;
  /** Content digest chosen by the publisher (e.g. "sha256:..."); '' for directories. */
  digest: string;
  /**
   * Assigned by the backend: the namespace revision of the record's last change, so
   * it grows monotonically per key even across unpublish and republish. For a
   * directory it is the revision of the last change to its list of entries.
   */
  version: number;
  kind: 'file' | 'dir';
}

/** What a producer supplies; the backend assigns version and kind. */
export type PublishInput = Omit<FileRecord, 'version' | 'kind'>;

export interface PublishOptions {
  /**
   * The file's bytes, for a small file: a backend that pushes changes may hand
   * them to its watchers along with the change, so a reader elsewhere needs no
   * transfer. Never stored; backends that cannot push ignore it.
   */
  content?: Uint8Array;
}

export interface RankInfo {
  rank: number;
  /** Transfer endpoint, "host:port". */
  address: string;
  meta?: Record<string, string>;
}

export interface WaitOptions {
  /** Reject with DYAD_ETIMEDOUT after this long; absent means wait forever (DYAD's behaviour). */
  timeoutMs?: number;
  /** Reject with DYAD_EINTR when aborted (a FUSE interrupt). */
  signal?: AbortSignal;
}

export interface DirEntry {
  name: string;
  record: FileRecord;
}

export interface Kvs {
  /** Publishes (or republishes) a file; parent directories come into being implicitly. */
  publish(ns: string, upath: string, rec: PublishInput, opts?: PublishOptions): Promise<FileRecord>;
  /** Non-blocking; '' is the namespace root, a directory holding published files is kind 'dir'. */
  lookup(ns: string, upath: string): Promise<FileRecord | undefined>;
  /**
   * A lookup that asks the store itself, past any cache of this client (and
   * refreshes that cache). Optional: without it, lookup() already asks.
   */
  lookupFresh?(ns: string, upath: string): Promise<FileRecord | undefined>;
  /** Resolves once upath exists (file or directory); pushed by the server, never polled. */
  wait(ns: string, upath: string, opts?: WaitOptions): Promise<FileRecord>;
  /**
   * What this client knows about upath without asking anyone: its record,
   * undefined for an absence it knows of, null when only a lookup could
   * tell. Optional: a backend without it always has to ask.
   */
  known?(ns: string, upath: string): FileRecord | undefined | null;
  /** False when nothing was published there; DYAD_EISDIR for a directory. */
  unpublish(ns: string, upath: string): Promise<boolean>;
  /** Entries sorted by name; DYAD_ENOENT if the directory does not exist, DYAD_ENOTDIR for a file. */
  list(ns: string, dirUpath: string): Promise<DirEntry[]>;
  /** DYAD_EEXIST if it exists. */
  createNamespace(ns: string): Promise<void>;
  removeNamespace(ns: string): Promise<void>;
  listNamespaces(): Promise<string[]>;
  hasNamespace(ns: string): Promise<boolean>;
  /** Registers or replaces the rank's entry. */
  registerRank(ns: string, info: RankInfo): Promise<void>;
  lookupRank(ns: string, rank: number): Promise<RankInfo | undefined>;
  /** Sorted by rank. */
  listRanks(ns: string): Promise<RankInfo[]>;
  /** Pending waits reject with DYAD_ECLOSED. */
  close(): Promise<void>;
  /**
   * The bytes a publisher pushed with this exact version of the record, if
   * they reached this client and are still held (a cache implements it);
   * taking them lets them go.
   */
  takePushedContent?(ns: string, upath: string, rec: FileRecord): Uint8Array | undefined;
}

/** One path whose record changed; `record` undefined means it no longer exists. */
export interface KvsChange {
  upath: string;
  record: FileRecord | undefined;
  /** The published file's bytes, when its publisher pushed them (PublishOptions.content). */
  content?: Uint8Array;
}

export type KvsWatchEvent =
  /** Everything one operation changed: the file and any directories it created, removed or touched. */
  | { type: 'change'; ns: string; rev: number; changes: KvsChange[] }
  /** Events may have been missed (connection lost); forget what earlier events taught. Events resume by themselves. */
  | { type: 'reset'; ns: string }
  /** No further events: the namespace was removed, access was lost, or the handle closed. */
  | { type: 'closed'; ns: string; reason: Error };

export type KvsWatchListener = (event: KvsWatchEvent) => void;

/**
 * A backend that can push changes. Listeners see a namespace's changes in the order
 * they were applied, and before any reply to a request sent after the change.
 */
export interface WatchableKvs extends Kvs {
  /** Resolves once the subscription is live; the returned function ends it. */
  watch(ns: string, listener: KvsWatchListener): Promise<() => void>;
}

export function isWatchable(kvs: Kvs): kvs is WatchableKvs {
  return typeof (kvs as Partial<WatchableKvs>).watch === 'function';
}
