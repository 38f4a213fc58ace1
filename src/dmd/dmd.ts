/**
 * The DYAD managed directory: the storage mirror plus DYAD's producer and
 * consumer behaviour.
 *
 * - A file opened for writing is published when it is closed (close() waits
 *   for the KVS, unless publishing is asynchronous).
 * - Opening for reading a name that is not in local storage waits until some
 *   node publishes it, pulls it into local storage, then opens it. The wait
 *   happens in OPEN, not LOOKUP, so it holds no directory lock: LOOKUP hands
 *   the opener a placeholder node the kernel may not cache.
 * - stat and readdir show files published elsewhere from their records,
 *   without moving a byte; they never wait.
 * - With an origin (origin.ts), a name found nowhere else but in the origin
 *   shows from the origin's attributes, and opening it copies it from there
 *   and publishes it instead of waiting.
 *
 * See docs/SEMANTICS.md for the contract.
 */
import fs from 'node:fs';
import path from 'node:path';
import diagnostics from 'node:diagnostics_channel';
import { MirrorFs, NO_ENTRY, type Handle, type ListedEntry, type MirrorOptions, type Node } from './mirror.js';
import { Fetcher, REPLICAS } from './fetch.js';
import { Origin, type OriginStat } from './origin.js';
import { Storage, fstat, lstat, lstatIfExists } from './storage.js';
import { callerOf, callerPath, callerRawPath, closerState, holdsDescriptorOn, killedBySignal, sameProcess, type Caller } from '../fuse/caller.js';
import type { Attr, AttrReply, Entry, OpenReply, Refusal, RequestContext } from '../fuse/types.js';
import type { FileRecord, Kvs, PublishInput } from '../kvs/types.js';
import type { TransferClient } from '../dtl/types.js';
import { digestBuffer, digestFile } from '../dtl/digest.js';
import { PART_PREFIX, isStalePart } from '../dtl/part.js';
import { StorageMarks, type StorageMark } from './marks.js';
import { CopyCache, type CacheSettings } from './cache.js';
import { DyadError, errnoOf, errnos } from '../errors.js';

export const publishChannel = diagnostics.channel('dyad-fs:dmd:publish');

const S_IFDIR = 0o040000;
const O_DIRECTORY = fs.constants.O_DIRECTORY;
const S_IFREG = 0o100000;
/** Files up to this size are digested with one synchronous read. */
const SMALL_FILE = 256n * 1024n;
/** Publications the KVS failed: the first wait before trying again, and the longest. */
const RETRY_FIRST_MS = 1000;
const RETRY_MAX_MS = 60_000;
/** An open this soon after its LOOKUP saw no record does not ask the KVS again. */
const ORIGIN_FRESH_MS = 1000;
/** Marks listed entries that only the origin has. */
const FROM_ORIGIN = Symbol('origin');
/** Inode numbers shown for files not (yet) in local storage. */
const VIRTUAL_INO_BASE = 2 ** 52;

export interface DmdLog {
  debug(msg: string): void;
  info(msg: string): void;
  warn(msg: string): void;
  error(msg: string): void;
}

export interface DmdOptions extends MirrorOptions {
  /** Absolute path of the mountpoint, to tell a path's last component from the rest. */
  mountpoint: string;
  kvs: Kvs;
  ns: string;
  rank: number;
  serviceMux: number;
  sharedStorage: boolean;
  transfer?: TransferClient;
  /** The transport's name ("tcp", "ucx"), as ranks register it: a peer on another is refused with a reason. */
  dtlName?: string;
  asyncPublish: boolean;
  fsyncWrite: boolean;
  /**
   * Files up to this size written here travel with their publication to the
   * nodes watching the KVS (embedded KVS), so their readers need no transfer;
   * 0 turns it off. Not used for shared storage, where nothing moves.
   */
  pushMaxBytes: number;
  /** Reader waits give up with ETIMEDOUT after this long; undefined waits forever. */
  waitTimeoutMs?: number;
  /** Read-through directory for files no node has (absolute, outside mount and storage). */
  origin?: string;
  peerTimeoutMs: number;
  /** How long a rank not renewed stays registered (--rank-lease); default 10 s. */
  rankLeaseMs?: number;
  /** Eviction of copies pulled from other nodes or copied from the origin (DYAD_CACHE_*); none by default. */
  cache?: CacheSettings;
  log: DmdLog;
}

/** A copy kept for eviction: its record, and whether it came from the origin (then this node is its owner). */
interface CopyOf {
  rec: FileRecord;
  fromOrigin: boolean;
}

interface Virtual {
  /** The record the node shows; undefined while nothing is published yet. */
  rec?: FileRecord;
  /**
   * Shown from the origin (`rec` then holds its attributes, not a
   * publication): when the KVS was seen to have no record (ms, monotonic).
   */
  fromOriginAt?: number;
  /** A placeholder for a directory a reader's path runs through. */
  isDir: boolean;
}

export class DmdFs extends MirrorFs {
  private readonly virtual = new Map<number, Virtual>();
  /** What we last published per upath (mtime:size), so FLUSH and RELEASE publish once. */
  private readonly published = new Map<string, string>();
  /** Files a writer was killed holding: whatever they hold is not what it meant to write. */
  private readonly torn = new Map<Node, number>();
  /** Storage files marked "writing" (marks.ts) by this daemon, until their last writer closes them normally. */
  private readonly unfinished = new Set<Node>();
  private readonly marks: StorageMarks;
  /** Copies of other nodes' and the origin's files kept here, for eviction (cache.ts); tracks nothing unless enabled. */
  private readonly cache: CopyCache<CopyOf>;
  private trimScheduled = false;
  /** Our records withdrawn while their files are open for writing, by path: the file as recorded, and the record. */
  private readonly withdrawn = new Map<string, { stamp: string; rec: FileRecord }>();
  /** Publications the KVS failed, by path: the last wait before trying again. */
  private readonly retries = new Map<string, { delayMs: number; timer: NodeJS.Timeout }>();
  private stopped = false;
  readonly fetcher: Fetcher;
  private readonly origin: Origin | undefined;

  constructor(storage: Storage, private readonly o: DmdOptions) {
    super(storage, o);
    this.marks = new StorageMarks((errno) =>
      o.log.warn(`the storage takes no user extended attributes (${errno === errnos.ENOTSUP ? 'ENOTSUP' : `errno ${errno}`}): a restart cannot tell the files of writers that never finished, and publishes them; and it keeps the origin's files copied here as this node's own, never evicted`),
    );
    this.cache = new CopyCache<CopyOf>(o.cache ?? { capacityBytes: 0, policy: 'NONE', lowWatermark: 1, graceMs: 0 }, (upath, c) => this.evictCopy(upath, c));
    this.origin = o.origin !== undefined ? new Origin(o.origin) : undefined;
    this.fetcher = new Fetcher({
      onCopy: this.cache.enabled ? (upath, rec) => this.copyLanded(upath, { rec, fromOrigin: false }) : undefined,
      onOriginCopy: (upath, rec) => this.originCopied(upath, rec),
      origin: this.origin,
      kvs: o.kvs,
      ns: o.ns,
      rank: o.rank,
      serviceMux: o.serviceMux,
      sharedStorage: o.sharedStorage,
      transfer: o.transfer,
      dtlName: o.dtlName,
      storage,
      peerTimeoutMs: o.peerTimeoutMs,
      rankLeaseMs: o.rankLeaseMs,
      log: o.log,
    });
  }

  // ---- readers of missing names -------------------------------------

  override lookup(ctx: RequestContext, parent: number, name: string): Entry | Refusal | Promise<Entry | Refusal> {
    // Pulls in progress are not part of the namespace.
    if (name.startsWith(PART_PREFIX) || (parent === 1 && name === REPLICAS)) return NO_ENTRY;
    return super.lookup(ctx, parent, name);
  }

  protected override lookupMissing(ctx: RequestContext, dir: Node, name: string, caller: Caller): Entry | Refusal | Promise<Entry | Refusal> {
    const upath = this.childRel(dir, name);
    if (caller.kind === 'create') {
      // Creating never waits, whatever is published under that name: a new
      // local file shadows it. But a directory on the way to the created
      // name may be one that holds files published elsewhere (or the
      // origin's): those exist on every node. Where the caller's path is
      // not known (link, rename and symlink name two paths; /proc may be
      // unreadable) the name may be either, so a published directory is
      // shown: right on the way, and as on every node at the end (EEXIST).
      // Nothing published under it, and no origin: nothing to show either
      // way. Known at once where the KVS is in this process (this daemon
      // serves it), which spares reading the caller's path.
      if (!this.origin && this.knownRecord(upath) === undefined) return NO_ENTRY;
      if (this.createsInside(caller, upath) === 'last') return NO_ENTRY;
      return this.o.kvs.lookup(this.o.ns, upath).then((rec) => {
        if (rec?.kind === 'dir') return this.localOrRemote(dir, name, rec);
        const inOrigin = rec ? undefined : this.origin?.stat(upath);
        if (inOrigin?.kind === 'dir') return this.originEntry(dir, name, inOrigin);
        return NO_ENTRY;
      });
    }
    // knownRecord: a record is an object; none (undefined) and "ask" (null) are both falsy.
    if (caller.kind === 'open' && caller.flags !== undefined && !this.origin && !this.knownRecord(upath)) {
      // A reader, and this node knows of no record for the name. Its open waits
      // for it anyway, and that wait answers at once if the name is
      // published: asking the KVS here too would cost a second round trip,
      // on every file a consumer opens before (or just as) it is published.
      // Not for exec, whose permission check needs the record's mode now.
      const where = this.componentOf(caller, upath);
      if (where !== 'unknown') return this.remoteEntry(dir, name, undefined, where === 'inner' || ((caller.flags ?? 0) & O_DIRECTORY) !== 0);
    }
    return this.o.kvs.lookup(this.o.ns, upath).then((rec) => {
      // For files owned on this node, local storage is the truth.
      if (rec && !(rec.kind === 'file' && this.fetcher.isLocalOwner(rec.owner) && !this.o.sharedStorage)) return this.localOrRemote(dir, name, rec);
      const inOrigin = rec ? undefined : this.origin?.stat(upath);
      if (inOrigin) return this.originEntry(dir, name, inOrigin);
      if (caller.kind !== 'open') return NO_ENTRY;
      // Nothing published yet. The opener gets a placeholder and waits in
      // OPEN (or OPENDIR), where the kernel holds no directory lock: a reader
      // waiting for x/y must not stop a producer on this node from creating x.
      const where = this.componentOf(caller, upath);
      if (where === 'unknown') {
        // Without the caller's path we cannot tell a file from a directory
        // on the way: wait here, which is always correct if coarser.
        return this.fetcher
          .ensureLocal(upath, { signal: ctx.signal, timeoutMs: this.o.waitTimeoutMs })
          .then((r) => this.localOrRemote(dir, name, r));
      }
      const wantsDir = where === 'inner' || ((caller.flags ?? 0) & O_DIRECTORY) !== 0;
      return this.remoteEntry(dir, name, undefined, wantsDir);
    });
  }

  /** What this node knows of upath's record without asking: the record, undefined (none), or null (only a lookup can tell). */
  private knownRecord(upath: string): FileRecord | undefined | null {
    const kvs = this.o.kvs;
    return kvs.known ? kvs.known(this.o.ns, upath) : null;
  }

  /**
   * componentOf for a create. A path whose last component is the name
   * looked up, and that names it nowhere else and has no '.' or '..', is the
   * name itself wherever it starts: that spares reading the caller's cwd
   * link, a /proc round trip on every create. Whatever a symlink on the way
   * expands to, such a path cannot make 'inner' true.
   */
  private createsInside(caller: Caller, upath: string): 'last' | 'inner' | 'unknown' {
    const raw = callerRawPath(caller);
    if (raw === undefined) return 'unknown';
    const name = upath.slice(upath.lastIndexOf('/') + 1);
    const parts = raw.split('/').filter((part) => part !== '');
    const at = parts.indexOf(name);
    if (at === parts.length - 1 && !parts.includes('.') && !parts.includes('..')) return 'last';
    return this.componentOf(caller, upath, raw);
  }

  /** Is upath the last component of the path the caller opens, or a directory on the way? */
  private componentOf(caller: Caller, upath: string, raw?: string): 'last' | 'inner' | 'unknown' {
    const p = callerPath(caller, raw);
    if (!p) return 'unknown';
    const want = path.posix.join(this.o.mountpoint, upath);
    const got = path.posix.normalize(p).replace(/\/+$/, '');
    if (got === want) return 'last';
    if (got.startsWith(`${want}/`)) return 'inner';
    return 'unknown'; // a symlink or .. on the way: do not guess
  }

  /** Entry for a published record: directories exist locally, files are virtual until pulled. */
  private localOrRemote(dir: Node, name: string, rec: FileRecord): Entry {
    const p = this.storage.abs(this.childRel(dir, name));
    if (rec.kind === 'dir') fs.mkdirSync(p, { recursive: true, mode: 0o755 });
    let st: fs.BigIntStats | undefined;
    try {
      st = lstatIfExists(p);
    } catch {
      st = undefined; // not usable locally: show the record
    }
    return st ? this.entryFor(dir, name, st) : this.remoteEntry(dir, name, rec);
  }

  /**
   * A name only the origin has: a directory is made locally (it holds
   * nothing until files are read); a file shows the origin's attributes
   * until an open copies it.
   */
  private originEntry(dir: Node, name: string, st: OriginStat): Entry {
    if (st.kind === 'dir') {
      const p = this.storage.abs(this.childRel(dir, name));
      fs.mkdirSync(p, { recursive: true, mode: 0o755 });
      return this.entryFor(dir, name, lstat(p));
    }
    const attrs: FileRecord = { owner: -1, size: st.size, mode: st.mode, mtimeMs: st.mtimeMs, digest: '', version: 0, kind: 'file' };
    const entry = this.remoteEntry(dir, name, attrs);
    this.virtual.set(entry.nodeid, { rec: attrs, isDir: false, fromOriginAt: performance.now() });
    return entry;
  }

  private remoteEntry(dir: Node, name: string, rec: FileRecord | undefined, isDir = false): Entry {
    const entry = this.virtualEntry(dir, name, this.remoteAttr(rec, 0, isDir));
    entry.attr.ino = VIRTUAL_INO_BASE + entry.nodeid;
    // A record's attributes stay true once the file is pulled (the pull
    // checks size and digest), so the kernel may keep them briefly and skip
    // a GETATTR before OPEN. Without passthrough the kernel's reads trust
    // its cached size, so there we leave nothing cached.
    if (rec && this.passthroughActive) entry.attrTtlMs = 1000;
    this.virtual.set(entry.nodeid, rec ? { rec, isDir } : { isDir });
    return entry;
  }

  private remoteAttr(rec: FileRecord | undefined, ino: number, isDir = false): Attr {
    const ns = BigInt(Math.round((rec?.mtimeMs ?? Date.now()) * 1e6));
    const size = rec?.size ?? 0;
    return {
      ino,
      size,
      blocks: Math.ceil(size / 512),
      atimeNs: ns,
      mtimeNs: ns,
      ctimeNs: ns,
      mode: rec ? (rec.kind === 'dir' ? S_IFDIR | 0o755 : rec.mode) : isDir ? S_IFDIR | 0o755 : S_IFREG | 0o644,
      nlink: isDir ? 2 : 1,
      uid: process.getuid?.() ?? 0,
      gid: process.getgid?.() ?? 0,
      rdev: 0,
      blksize: 4096,
    };
  }

  override forget(nodeid: number, nlookup: number): void {
    super.forget(nodeid, nlookup);
    if (this.virtual.has(nodeid) && !this.nodes.get(nodeid)) this.virtual.delete(nodeid);
  }

  override getattr(ctx: RequestContext, nodeid: number, fh: number | undefined): AttrReply | Promise<AttrReply> {
    const v = this.virtual.get(nodeid);
    if (!v) return super.getattr(ctx, nodeid, fh);
    const node = this.node(nodeid);
    // It arrived meanwhile (pulled, or created here): a normal node now.
    if (this.arrived(nodeid, node, true)) return super.getattr(ctx, nodeid, fh);
    if (!v.rec && !v.isDir && callerOf(ctx.pid).exec) {
      // exec checks the execute bit before it opens (where readers wait):
      // a program not published yet is waited for here, so its mode is
      // the record's. The kernel holds no directory lock during this check.
      const upath = this.rel(node);
      return this.o.kvs.wait(this.o.ns, upath, { signal: ctx.signal, timeoutMs: this.o.waitTimeoutMs }).then((rec) => {
        if (this.virtual.get(nodeid) === v) v.rec = rec;
        // A directory keeps the placeholder's attributes (no execute bit): exec fails with EACCES.
        return { attr: this.remoteAttr(rec.kind === 'dir' ? undefined : rec, VIRTUAL_INO_BASE + nodeid), ttlMs: 0 };
      });
    }
    return { attr: this.remoteAttr(v.rec, VIRTUAL_INO_BASE + nodeid, v.isDir), ttlMs: 0 };
  }

  /**
   * Makes a placeholder a normal node if its name is now in storage
   * (pulled, copied or created here since its LOOKUP). A directory counts
   * only if `dirs`: a name shown as a file is not opened as one.
   */
  private arrived(nodeid: number, node: Node, dirs: boolean): boolean {
    const st = lstatIfExists(this.abs(node));
    if (!st || (!dirs && st.isDirectory())) return false;
    this.materialize(node, st);
    this.virtual.delete(nodeid);
    return true;
  }

  override open(ctx: RequestContext, nodeid: number, flags: number): OpenReply | Promise<OpenReply> {
    const node = this.node(nodeid);
    const upath = this.rel(node);
    const v = this.virtual.get(nodeid);
    if (v) {
      // Names looked up while missing are not cached (TTL 0), so readers
      // racing for one file can hold different placeholders for it: the
      // file may have arrived, by another's open, after this one's LOOKUP.
      // Fetching it again would copy or pull it a second time.
      if (this.arrived(nodeid, node, false)) return super.open(ctx, nodeid, flags);
      // An open right after the LOOKUP that found the name only in the origin
      // (the usual case) goes straight to the origin.
      const at = v.fromOriginAt;
      const originFirst = at !== undefined && performance.now() - at < ORIGIN_FRESH_MS;
      return this.fetcher.ensureLocal(upath, { signal: ctx.signal, timeoutMs: this.o.waitTimeoutMs, known: at === undefined ? v.rec : undefined, originFirst }).then((rec) => {
        if (rec.kind === 'dir' && !v.isDir) {
          // The name was shown as a file (nothing was known of it at its
          // LOOKUP) and turned out to be a directory. The kernel must not
          // open it as a file: drop its cached name first (the kernel holds
          // no directory lock in OPEN), so that the next lookup finds the
          // directory.
          const isDir = new DyadError('DYAD_EISDIR', errnos.EISDIR, `${upath} is a directory`);
          const forget = node.parent && this.session ? this.session.notifyInvalEntry(node.parent.id, node.name) : Promise.resolve();
          return forget.then(() => {
            throw isDir;
          });
        }
        this.materialize(node);
        this.virtual.delete(nodeid);
        return super.open(ctx, nodeid, flags);
      });
    }
    // Before anything is done for it (a rewrite withdraws the publication).
    this.checkOpen(ctx, node, flags);
    const reading = (flags & 3) === fs.constants.O_RDONLY;
    if (this.o.sharedStorage && reading) {
      // Shared storage: the file may be there while its producer still writes
      // it on another node; a reader waits for the publication.
      return this.fetcher.ensureLocal(upath, { signal: ctx.signal, timeoutMs: this.o.waitTimeoutMs }).then(() => this.openNode(ctx, node, flags));
    }
    if (!reading && (this.published.has(upath) || this.o.sharedStorage)) return this.withdrawForRewrite(upath).then(() => this.openNode(ctx, node, flags));
    if (reading) this.cache.touch(upath);
    return this.openNode(ctx, node, flags);
  }

  protected override hidden(name: string): boolean {
    return name.startsWith(PART_PREFIX);
  }

  /** Listing a directory nobody has published yet: wait for it, as for a file. */
  override opendir(ctx: RequestContext, nodeid: number, flags: number): OpenReply | Promise<OpenReply> {
    const v = this.virtual.get(nodeid);
    if (!v) return super.opendir(ctx, nodeid, flags);

    const node = this.node(nodeid);
    return this.fetcher.ensureLocal(this.rel(node), { signal: ctx.signal, timeoutMs: this.o.waitTimeoutMs }).then(() => {
      this.materialize(node);
      this.virtual.delete(nodeid);
      return super.opendir(ctx, nodeid, flags);
    });
  }

  // ---- listings -----------------------------------------------------------

  protected override extraEntries(dir: Node): Promise<ListedEntry[]> {
    return this.o.kvs.list(this.o.ns, this.rel(dir)).then(
      (list) => {
        const out: ListedEntry[] = list.filter((e) => dir.parent || e.name !== REPLICAS).map((e) => ({
          name: e.name,
          mode: e.record.kind === 'dir' ? S_IFDIR : e.record.mode,
          ino: 0,
          extra: e.record,
        }));
        return [...out, ...this.originListing(dir, new Set(out.map((e) => e.name)))];
      },
      (err: unknown) => {
        const code = (err as { code?: string }).code;
        if (code === 'DYAD_ENOENT' || code === 'DYAD_ENOTDIR') return this.originListing(dir, new Set()); // nothing published here
        throw err;
      },
    );
  }

  /** The origin's entries of `dir` not named in `published`. */
  private originListing(dir: Node, published: Set<string>): ListedEntry[] {
    if (!this.origin) return [];
    return this.origin
      .list(this.rel(dir))
      .filter((o) => !published.has(o.name) && !this.hidden(o.name) && (dir.parent || o.name !== REPLICAS))
      .map((o) => ({ name: o.name, mode: o.isDir ? S_IFDIR : S_IFREG, ino: 0, extra: FROM_ORIGIN }));
  }

  protected override readdirEntry(dir: Node, e: ListedEntry): Entry {
    const entry = super.readdirEntry(dir, e);
    if (entry.nodeid !== 0 || !e.extra) return entry;
    // The origin's names go out without attributes (a zero node id): listing
    // a dataset of a million samples must not stat each one on the shared
    // file system. A program that wants them (ls -l) looks each one up.
    if (e.extra === FROM_ORIGIN) return entry;
    return this.localOrRemote(dir, e.name, e.extra as FileRecord);
  }

  // ---- producers --------------------------------------------------------------

  /**
   * close() of a descriptor open for writing: publish now, so close() returns
   * after the publication, unless more writes may follow through another
   * descriptor: the closing process, or a child of it, still holds one (a
   * shell's `>` opens, dup2s and closes the first descriptor before anything
   * is written; a parent hands the file to a child as its stdout and closes
   * its own copy), or the closer is not the process that opened the file
   * (a child closing an inherited copy). Those are published at the last
   * RELEASE, when every descriptor in every process is closed.
   */
  override flush(ctx: RequestContext, nodeid: number, fh: number): void | Promise<void> {
    const h = this.handle(fh);
    if (!h.writable || !ctx.pid) return;
    const closer = closerState(ctx.pid);
    // The kernel closing the descriptors of a process a signal killed: its
    // file may be cut anywhere, and publishing it would hand readers a torn
    // copy as if complete (DYAD, whose close() is never called, publishes
    // nothing either). It stays unpublished, local to this node.
    if ((closer === 'exiting' || closer === undefined) && killedBySignal(ctx.pid)) {
      this.torn.set(h.node, ctx.pid);
      return;
    }
    if (!h.opener) return;
    // execve closing a close-on-exec descriptor: nothing more may be read
    // about this process until we answer (see closerState). It is published
    // at the last RELEASE, which follows when no other descriptor is left.
    if (closer === 'exec') return;
    // close() does not wait for an asynchronous publication, so nothing is
    // gained by starting it here rather than at the last RELEASE, which the
    // kernel sends moments later; waiting for that spares the descriptor
    // scan below, whose cost grows with the closer's open descriptors.
    if (this.o.asyncPublish) return;
    // A process that inherited the descriptor (a child of the opener) closing its copy.
    if (!sameProcess(h.opener, ctx.pid)) return;
    const mine = path.posix.join(this.o.mountpoint, this.rel(h.node));
    // Cannot tell (no /proc): leave it to the last RELEASE.
    if (holdsDescriptorOn(ctx.pid, mine) !== false) return;
    this.finished(h.node, h.fd);
    // With passthrough the handle's descriptor is the node's backing file,
    // readable and opened with O_NOATIME: the digest reads through it.
    const p = this.publishSoon(h.node, fstat(h.fd), h.passthrough ? h.fd : undefined);
    if (!p) return;
    // No other descriptor shares this open, and with passthrough no write
    // comes through us: what RELEASE would stat is what was just
    // published. (Without passthrough a mapping of the file keeps the open
    // alive and may still write: RELEASE looks then.)
    if (h.passthrough) {
      p.then(
        () => (h.settled = true),
        () => undefined,
      );
    }
    return untilInterrupted(p, ctx);
  }

  protected override afterWriteClose(node: Node, h: Handle, st: fs.BigIntStats): void | Promise<void> {
    // The last writer's RELEASE: the kernel sends it once every descriptor
    // sharing the open is closed (a shell's `>` dup2s and closes one early,
    // which is why FLUSH is too soon).
    if (this.writersOf(node) > 0) return;
    const killed = this.torn.get(node);
    if (killed !== undefined) {
      this.torn.delete(node);
      // Its mark stays on the file: a restart does not publish it either.
      this.unfinished.delete(node);
      this.o.log.warn(`${this.rel(node)} not published: its writer (pid ${killed}) was killed by a signal while it had the file open`);
      return;
    }
    // By path: with passthrough the descriptor is closed by now. A file
    // removed while open is skipped: its path may name a newer file.
    if (st.nlink > 0n) this.finished(node, this.abs(node));
    else this.unfinished.delete(node);
    return this.publishSoon(node, st);
  }

  protected override afterWriteOpen(node: Node, fd: number): void {
    // Written here: this node's file now, published as such at its close.
    if (this.cache.enabled) this.notACopy(this.rel(node));
    if (this.unfinished.has(node)) return;
    this.marks.set(fd, 'writing');
    this.unfinished.add(node);
  }

  /** Its last writer closed `node` normally: the mark goes before the publication starts. */
  private finished(node: Node, target: number | string): void {
    if (!this.unfinished.delete(node)) return;
    this.marks.clear(target);
  }

  /** Handles still open for writing on a node. */
  private writersOf(node: Node): number {
    let n = 0;
    for (const h of this.handles.values()) if (h.node === node && h.writable) n++;
    return n;
  }

  /** `st`: the file as its writer left it, from the writer's descriptor; `fd`: one to read it through. */
  private publishSoon(node: Node, st: fs.BigIntStats, fd?: number): Promise<void> | undefined {
    const p = this.publish(this.rel(node), true, st, fd);
    if (!this.o.asyncPublish) return p;
    p.catch(() => undefined);
    return undefined;
  }

  /**
   * Publishes a local file unless this exact version is published already.
   * `push`: a file just written may travel with its publication (small ones only).
   * `st`: the file as its writer left it, taken through the writer's
   * descriptor, which spares walking its path. Its bytes are read through
   * a descriptor opened with O_NOATIME, as reading must not touch the
   * atime: `fd`, a small file's when it has one (which spares an open and
   * a close), else one of our own.
   */
  async publish(upath: string, push = false, st?: fs.BigIntStats, fd?: number): Promise<void> {
    const abs = this.storage.abs(upath);
    // Set before the record goes to the KVS: a failure after it is the KVS's.
    let atKvs = false;
    let failedAtKvs = false;
    try {
      const before = st ?? lstat(abs);
      // Removed while open: nothing to publish (as the path's ENOENT says, below).
      if (before.nlink === 0n) return;
      const stamp = `${before.mtimeNs}:${before.size}`;
      if (this.published.get(upath) === stamp || !before.isFile()) return;
      const was = this.withdrawn.get(upath);
      this.withdrawn.delete(upath);
      if (was?.stamp === stamp) {
        // Opened for writing and left as it was: its old record, unread.
        const { size, mtimeMs, digest } = was.rec;
        atKvs = true;
        return await this.putRecord(upath, stamp, { size, mode: Number(before.mode), mtimeMs, digest });
      }
      if (this.o.fsyncWrite) fsyncPath(abs);
      // Small files: one synchronous read beats three thread-pool round trips.
      const { digest, size, data } = before.size <= SMALL_FILE ? digestSmall(abs, Number(before.size), fd) : await digestLarge(abs);
      const pushIt = push && data !== undefined && size <= this.o.pushMaxBytes && !this.o.sharedStorage;
      atKvs = true;
      await this.putRecord(upath, stamp, { size, mode: Number(before.mode), mtimeMs: Number(before.mtimeNs / 1_000_000n), digest }, pushIt ? data : undefined);
    } catch (err) {
      if (!atKvs && (err as NodeJS.ErrnoException).code === 'ENOENT') return; // removed before we got to it
      failedAtKvs = atKvs;
      const retryMs = atKvs ? this.retryLater(upath) : undefined;
      this.o.log.error(`publish of ${upath} failed: ${(err as Error).message}${retryMs ? `; trying again in ${retryMs / 1000} s` : ''}`);
      throw new DyadError('DYAD_EPUBLISH', errnoOf(err) === errnos.ENOSPC ? errnos.ENOSPC : errnos.EIO, `${upath}: publish failed`, { cause: err });
    } finally {
      if (!failedAtKvs) this.dropRetry(upath);
    }
  }

  /**
   * The KVS failed a publication (its client had tried for its whole request
   * timeout): the file is complete in storage, and readers elsewhere wait
   * for it, however its writer took the error (a shell's `>` never sees
   * one). It is published again in the background, 1 s later, then at
   * doubling intervals up to a minute, until it lands or the file goes.
   */
  private retryLater(upath: string): number | undefined {
    if (this.stopped) return undefined;
    const prev = this.retries.get(upath);
    clearTimeout(prev?.timer);
    const delayMs = prev ? Math.min(RETRY_MAX_MS, prev.delayMs * 2) : RETRY_FIRST_MS;
    const timer = setTimeout(() => void this.publish(upath).catch(() => undefined), delayMs);
    timer.unref();
    this.retries.set(upath, { delayMs, timer });
    return delayMs;
  }

  private dropRetry(upath: string): void {
    const r = this.retries.get(upath);
    if (!r) return;
    clearTimeout(r.timer);
    this.retries.delete(upath);
  }

  /** The daemon is stopping: no more attempts. */
  stop(): void {
    this.stopped = true;
    for (const r of this.retries.values()) clearTimeout(r.timer);
    this.retries.clear();
  }

  // ---- copies (of other nodes' and the origin's files): eviction, DYAD_CACHE_* ----

  private copyLanded(upath: string, c: CopyOf): void {
    this.cache.add(upath, c.rec.size, c);
    this.trimSoon();
  }

  /**
   * A file copied from the origin and published as ours: marked as such
   * (marks.ts), so that a restart still knows it may be evicted.
   */
  private originCopied(upath: string, rec: FileRecord): void {
    const abs = this.storage.abs(upath);
    this.marks.set(abs, 'origin');
    // Published as ours: a rewrite withdraws it first, an unlink or a rename takes the record along.
    const st = lstatIfExists(abs);
    if (st) this.published.set(upath, `${st.mtimeNs}:${st.size}`);
    if (this.cache.enabled) this.copyLanded(upath, { rec, fromOrigin: true });
  }

  /**
   * Is the origin's file still what this node copied? Else the copy here
   * may be the only one left (the dataset changed or went): not evictable.
   * A file renamed since keeps its mark, and fails this too.
   */
  private originStillHas(upath: string, rec: FileRecord): boolean {
    const o = this.origin?.stat(upath);
    return o?.kind === 'file' && o.size === rec.size && o.mtimeMs === rec.mtimeMs;
  }

  /**
   * Evicts once the loop has run what is queued: the readers whose pulls
   * just landed have opened their files by then, and an open file stays.
   */
  private trimSoon(): void {
    if (this.trimScheduled || this.cache.usedBytes <= 0) return;
    this.trimScheduled = true;
    setImmediate(() => {
      this.trimScheduled = false;
      const before = this.cache.usedBytes;
      const gone = this.cache.trim((upath) => this.fetcher.fetching(upath));
      if (gone.length) this.o.log.info(`evicted ${gone.length} copies (${before - this.cache.usedBytes} B); copies kept: ${this.cache.usedBytes} B`);
    });
  }

  /**
   * Removes a copy from storage unless a program has it open. Its node, if
   * the kernel knows one, shows the record again as a remote file, so an
   * open through a name the kernel still caches fetches it once more. An
   * origin copy's record is withdrawn: the next reader anywhere copies it
   * from the origin again.
   */
  private evictCopy(upath: string, c: CopyOf): 'evicted' | 'busy' | 'not-a-copy' {
    const abs = this.storage.abs(upath);
    let st: fs.BigIntStats | undefined;
    try {
      st = lstatIfExists(abs);
    } catch {
      return 'busy';
    }
    if (st === undefined) {
      this.forgetCopy(upath, c);
      return 'not-a-copy';
    }
    // Changed here since it landed (a write through the mount would have
    // dropped it already): not the owner's bytes any more, so not a copy.
    if (!st.isFile() || Number(st.size) !== c.rec.size) return 'not-a-copy';
    if (c.fromOrigin && !this.originStillHas(upath, c.rec)) return 'not-a-copy';
    const node = this.byIno.get(Number(st.ino));
    if (node && this.inUse(node)) return 'busy';
    try {
      fs.unlinkSync(abs);
    } catch (err) {
      this.o.log.warn(`eviction of ${upath} failed: ${(err as Error).message}`);
      return 'busy';
    }
    this.forgetCopy(upath, c);
    if (node) {
      this.byIno.delete(node.ino);
      this.virtual.set(node.id, { rec: c.rec, isDir: false });
    }
    return 'evicted';
  }

  /** The others stop counting on this node's copy. */
  private forgetCopy(upath: string, c: CopyOf): void {
    if (!c.fromOrigin) {
      this.fetcher.dropCopy(upath);
      return;
    }
    this.published.delete(upath);
    // Unless another node's copy from the origin has been published since.
    void this.o.kvs
      .lookup(this.o.ns, upath)
      .then((rec) => (rec?.owner === this.o.rank ? this.o.kvs.unpublish(this.o.ns, upath) : false))
      .catch((e: Error) => this.o.log.warn(`withdrawing the record of evicted ${upath}: ${e.message}`));
  }

  private inUse(node: Node): boolean {
    if (node.backing || node.openFds.size > 0) return true;
    for (const h of this.handles.values()) if (h.node === node) return true;
    return false;
  }

  /**
   * A path, and any path under it, no longer holds the copy it held
   * (removed, renamed, written here). A pulled copy's replica record goes;
   * an origin copy's own record stays with the file (unlink and rename see
   * to it).
   */
  private notACopy(rel: string): void {
    const c = this.cache.remove(rel);
    if (c && !c.fromOrigin) this.fetcher.dropCopy(rel);
    for (const [p, under] of this.cache.removeUnder(rel)) if (!under.fromOrigin) this.fetcher.dropCopy(p);
  }

  /**
   * After a restart: publish what the storage holds, so a node that comes
   * back serves its files again. Files that are copies pulled from another
   * owner (a record names someone else with the same size) stay theirs.
   */
  async republishStorage(): Promise<{ published: number; kept: number; unfinished: string[] }> {
    let published = 0;
    let kept = 0;
    // Marked by a writer that never closed them (marks.ts): killed, or
    // cut off when the last daemon stopped. Their bytes may stop anywhere.
    const unfinished: string[] = [];
    const walk = async (rel: string): Promise<void> => {
      let entries: fs.Dirent[];
      try {
        entries = fs.readdirSync(this.storage.abs(rel), { withFileTypes: true });
      } catch {
        return;
      }
      for (const e of entries) {
        const upath = rel === '' ? e.name : `${rel}/${e.name}`;
        if (e.isDirectory()) await walk(upath);
        if (e.isFile() && e.name.startsWith(PART_PREFIX)) {
          // Left by a pull that died with a previous daemon; another daemon
          // on this storage may have one under way.
          if (isStalePart(e.name)) fs.rmSync(this.storage.abs(upath), { force: true });
          continue;
        }
        if (!e.isFile()) continue;
        const mark = this.marks.get(this.storage.abs(upath));
        if (mark === 'writing') {
          unfinished.push(upath);
          continue;
        }
        const st = lstat(this.storage.abs(upath));
        const rec = await this.o.kvs.lookup(this.o.ns, upath).catch(() => undefined);
        const sameSize = rec?.kind === 'file' && rec.size === Number(st.size);
        if (sameSize && (rec.owner !== this.o.rank || rec.mtimeMs === Number(st.mtimeNs / 1_000_000n))) {
          if (rec.owner === this.o.rank) this.published.set(upath, `${st.mtimeNs}:${st.size}`);
          this.countFound(upath, st, rec, mark);
          kept++;
          continue;
        }
        const ok = await this.publish(upath).then(
          () => true,
          () => false, // publish() logged it
        );
        if (!ok) continue;
        published++;
        // Its record, from this node's KVS cache, which the publication filled.
        const out = mark === 'origin' && this.cache.enabled ? await this.o.kvs.lookup(this.o.ns, upath).catch(() => undefined) : undefined;
        if (out) this.countFound(upath, st, out, mark);
      }
    };
    await walk('');
    this.trimSoon();
    return { published, kept, unfinished };
  }

  /**
   * A restart found `upath` in storage under `rec`: counted for eviction if
   * it is a copy, as old as its file and as recently used as its atime says.
   * One pulled from another node is known by its record; one copied from
   * the origin, published as ours, by its mark.
   */
  private countFound(upath: string, st: fs.BigIntStats, rec: FileRecord, mark: StorageMark | undefined): void {
    if (!this.cache.enabled) return;
    const fromOrigin = rec.owner === this.o.rank;
    if (fromOrigin ? mark !== 'origin' || !this.originStillHas(upath, rec) : this.fetcher.isLocalOwner(rec.owner)) return;
    this.cache.add(upath, rec.size, { rec, fromOrigin }, Number(st.mtimeMs), Number(st.atimeMs));
  }

  /** A file we published is gone: so is its record, before unlink() returns. */
  protected override afterRemove(rel: string): void | Promise<void> {
    this.fetcher.forgetDirs();
    this.notACopy(rel);
    this.withdrawn.delete(rel);
    if (!this.published.delete(rel)) return;
    return this.unpublish(rel);
  }

  /**
   * A renamed file we published is published under its new name, before
   * rename() returns; so is every file we published inside a renamed
   * directory (a workflow that fills a directory and then renames it to
   * say it is complete has readers waiting on the new names).
   */
  protected override afterRename(fromRel: string, toRel: string, node: Node | undefined): void | Promise<void> {
    // A copy under another name is not where its record says.
    this.notACopy(fromRel);
    if (node?.isDir) {
      this.fetcher.forgetDirs();
      const inside = [...this.published.keys()].filter((k) => k.startsWith(`${fromRel}/`));
      if (inside.length === 0) return;
      return (async () => {
        for (const k of inside) await this.movePublished(k, toRel + k.slice(fromRel.length));
      })();
    }
    if (node) return this.movePublished(fromRel, toRel);
    if (this.published.delete(fromRel)) return this.unpublish(fromRel);
  }

  /**
   * One published file's record moves to its new name. A rename does not
   * change the content, so while the file is as it was published the old
   * record's digest is kept instead of reading the file again.
   */
  private async movePublished(fromRel: string, toRel: string): Promise<void> {
    const stamp = this.published.get(fromRel);
    if (stamp === undefined) return;
    this.published.delete(fromRel);
    const old = await this.o.kvs.lookup(this.o.ns, fromRel).catch(() => undefined);
    await this.unpublish(fromRel);
    let st: fs.BigIntStats | undefined;
    try {
      st = lstatIfExists(this.storage.abs(toRel));
    } catch {
      st = undefined; // moved on again meanwhile: whatever happened to it next publishes it
    }
    if (!st?.isFile()) return;
    if (old?.kind !== 'file' || old.owner !== this.o.rank || `${st.mtimeNs}:${st.size}` !== stamp) {
      return this.publish(toRel).catch(() => undefined); // publish() logged it
    }
    try {
      await this.putRecord(toRel, stamp, { size: old.size, mode: Number(st.mode), mtimeMs: old.mtimeMs, digest: old.digest });
    } catch (err) {
      this.o.log.error(`publish of ${toRel} (renamed from ${fromRel}) failed: ${(err as Error).message}`);
    }
  }

  /** Publishes our record of upath; `stamp` is the file as recorded (see publish). */
  private async putRecord(upath: string, stamp: string, rec: Omit<PublishInput, 'owner'>, content?: Uint8Array): Promise<void> {
    const out = await this.o.kvs.publish(this.o.ns, upath, { owner: this.o.rank, ...rec }, content ? { content } : undefined);
    this.published.set(upath, stamp);
    if (publishChannel.hasSubscribers) publishChannel.publish({ upath, record: out });
  }

  /**
   * A published file opened for writing is withdrawn before the open
   * returns, and published again at its close: until then a reader
   * elsewhere waits for it, instead of reading (on shared storage) or
   * pulling (and failing its digest) a file being rewritten. On shared
   * storage the record may be another node's; it is withdrawn all the same.
   */
  private async withdrawForRewrite(upath: string): Promise<void> {
    const stamp = this.published.get(upath);
    this.published.delete(upath);
    // Opened for writing is not always written (HDF5's read-write opens):
    // keep what an unchanged file needs to be published again unread.
    const rec = stamp === undefined ? undefined : await this.o.kvs.lookup(this.o.ns, upath).catch(() => undefined);
    if (stamp !== undefined && rec?.kind === 'file' && rec.owner === this.o.rank) this.withdrawn.set(upath, { stamp, rec });
    await this.unpublish(upath);
  }

  private unpublish(rel: string): Promise<void> {
    return this.o.kvs.unpublish(this.o.ns, rel).then(
      () => undefined,
      (err: Error) => this.o.log.warn(`unpublish of ${rel} failed: ${err.message}`),
    );
  }
}

/** fsync through a fresh descriptor: it flushes the file's data whoever wrote it. */
function fsyncPath(p: string): void {
  const fd = fs.openSync(p, fs.constants.O_RDONLY);
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Reading to digest must not change the file's atime. */
function openNoatime(p: string): number {
  try {
    return fs.openSync(p, fs.constants.O_RDONLY | fs.constants.O_NOATIME);
  } catch {
    return fs.openSync(p, fs.constants.O_RDONLY); // O_NOATIME needs ownership or CAP_FOWNER
  }
}

/**
 * A close() waiting for its publication (say, for a KVS that stopped
 * answering) must not hold a program that was sent a signal: on INTERRUPT
 * the close() returns EINTR (the descriptor is closed all the same) and the
 * publication carries on in the background, as with DYAD_ASYNC_PUBLISH.
 * Only a publication still under way at the next turn of the event loop (a
 * KVS elsewhere) watches for that: one to the KVS served in this process
 * has landed by then, and an AbortSignal with its listener costs several
 * microseconds on every close().
 */
function untilInterrupted(p: Promise<void>, ctx: RequestContext): Promise<void> {
  return new Promise((resolve, reject) => {
    let done = false;
    p.then(
      () => ((done = true), resolve()),
      (err: unknown) => ((done = true), reject(err)),
    );
    setImmediate(() => {
      if (done) return;
      const signal = ctx.signal;
      const onAbort = () => reject(signal.reason);
      if (signal.aborted) return onAbort();
      signal.addEventListener('abort', onAbort, { once: true });
      p.finally(() => signal.removeEventListener('abort', onAbort)).catch(() => undefined);
    });
  });
}

/**
 * `expected`: the size just seen, so one read usually does (a file that
 * grew since is read whole). `given`: a descriptor to read through, left open.
 */
function digestSmall(p: string, expected: number, given?: number): { digest: string; size: number; data: Buffer } {
  const fd = given ?? openNoatime(p);
  try {
    const buf = Buffer.allocUnsafe(expected + 1);
    const n = fs.readSync(fd, buf, 0, buf.length, 0);
    const data = n <= expected ? buf.subarray(0, n) : readWhole(fd);
    return { digest: digestBuffer(data), size: data.length, data };
  } finally {
    if (given === undefined) fs.closeSync(fd);
  }
}

/** All of a file from offset 0, whatever its descriptor's position. */
function readWhole(fd: number): Buffer {
  const chunks: Buffer[] = [];
  for (let pos = 0; ; ) {
    const buf = Buffer.allocUnsafe(64 * 1024);
    const n = fs.readSync(fd, buf, 0, buf.length, pos);
    if (n === 0) return Buffer.concat(chunks);
    chunks.push(buf.subarray(0, n));
    pos += n;
  }
}

async function digestLarge(p: string): Promise<{ digest: string; size: number; data?: Buffer }> {
  const fd = openNoatime(p);
  try {
    return await digestFile(fd);
  } finally {
    fs.closeSync(fd);
  }
}
