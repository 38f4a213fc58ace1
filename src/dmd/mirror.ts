/**
 * The managed directory as a faithful mirror of its storage: every FUSE
 * operation becomes the same operation on the backing directory.
 *
 * With kernel passthrough, an open file is registered with the kernel once
 * per inode (the kernel refuses two different backing files for one inode),
 * and reads, writes and mmap never reach the daemon. Without it the daemon
 * serves READ straight from the backing fd in native code.
 *
 * Permissions: a root daemon checks them itself (the kernel's
 * default_permissions costs a GETATTR of the directory after every file
 * created in it): what it does in storage for a caller, it does with the
 * caller's identity (fuse/identity.ts), so the storage's rules decide.
 *
 * DYAD behaviour (waiting for missing files, publishing on close) is added
 * by subclasses through the protected hooks at the bottom.
 */
import fs from 'node:fs';
import { EventEmitter } from 'node:events';
import diagnostics from 'node:diagnostics_channel';
import { FATTR_ATIME, FATTR_GID, FATTR_MODE, FATTR_MTIME, FATTR_SIZE, FATTR_UID, FUSE_ROOT_ID, RENAME_EXCHANGE, RENAME_NOREPLACE } from '../fuse/abi.js';
import { InodeTable } from '../fuse/inodes.js';
import { native } from '../fuse/native.js';
import type { FuseSession } from '../fuse/session.js';
import {
  Refusal,
  type Attr,
  type AttrReply,
  type CreateReply,
  type DirEntry,
  type Entry,
  type FdSlice,
  type FileSystem,
  type OpenReply,
  type RequestContext,
  type SetAttrIn,
  type StatFs,
} from '../fuse/types.js';
import { callerOf, type Caller } from '../fuse/caller.js';
import { asCaller, canActAsCallers, checkAccess } from '../fuse/identity.js';
import { DyadError, errnos } from '../errors.js';
import { Storage, fstat, lstat, lstatIfExists, toAttr } from './storage.js';

const O_ACCMODE = 3;
const { O_RDONLY, O_RDWR, O_WRONLY, O_APPEND, O_CREAT, O_EXCL, O_TRUNC, O_NOFOLLOW, O_DIRECT, O_SYNC, O_DSYNC, O_NOATIME } =
  fs.constants;
const S_IFMT = 0o170000;
const { R_OK, W_OK, X_OK } = fs.constants;
/** In the flags of an OPEN made by execve (the kernel's __FMODE_EXEC). */
const FMODE_EXEC = 0x20;

/** LOOKUP's answer for a name that does not exist, returned rather than thrown (see Refusal). */
export const NO_ENTRY = new Refusal(errnos.ENOENT);

/** Published for each LOOKUP of a name missing from storage, with the caller's intent. */
export const missingChannel = diagnostics.channel('dyad-fs:dmd:missing');
const S_IFDIR = 0o040000;
const S_ISGID = 0o2000;

/** A file or directory the kernel knows by a node id. */
export interface Node {
  id: number;
  parent: Node | undefined;
  name: string;
  ino: number;
  isDir: boolean;
  /** Shared passthrough registration: one per inode, as the kernel requires. */
  backing?: { fd: number; id: number; refs: number };
  /** Our fds opened on this node, for fstat after unlink. */
  openFds: Set<number>;
  unlinked: boolean;
  /**
   * mtime and size when the kernel last cached this file's pages (served
   * mode): an open that finds them unchanged lets the kernel keep its cache.
   */
  cacheStamp?: string;
  /** Other names of a hard-linked file, so unlinking one keeps the node reachable. */
  aliases?: Array<{ parent: Node; name: string }>;
  /** A directory everyone may search (all three execute bits), as last seen. */
  searchable?: boolean;
}

export interface Handle {
  fd: number;
  node: Node;
  flags: number;
  passthrough: boolean;
  /** Opened for writing (the DMD publishes such files when closed). */
  writable: boolean;
  /** Thread that opened it (0 when unknown): a close by another process is one of a shared descriptor. */
  opener: number;
  /**
   * Its writes are all accounted for before RELEASE (a subclass handled
   * the last close at FLUSH, and with passthrough nothing can write
   * through it after): RELEASE skips the stat and afterWriteClose.
   */
  settled?: boolean;
}

/** A directory entry as opendir snapshots it; `extra` marks entries not in storage. */
export interface ListedEntry {
  name: string;
  mode: number;
  ino: number;
  extra?: unknown;
}

interface DirHandle {
  node: Node;
  entries: ListedEntry[];
}

export interface MirrorOptions {
  /** Use kernel passthrough when the session negotiated it. */
  passthrough?: boolean;
  /** Entry and attribute validity for local files, in ms. */
  ttlMs?: number;
  /** Leave permission checks to the kernel (default_permissions) even as root. */
  kernelPermissions?: boolean;
}

export class MirrorFs extends EventEmitter implements FileSystem {
  protected readonly nodes: InodeTable<Node>;
  protected readonly byIno = new Map<number, Node>();
  protected readonly handles = new Map<number, Handle>();
  private readonly dirs = new Map<number, DirHandle>();
  private nextFh = 1;
  protected session?: FuseSession;
  protected passthrough = false;
  protected readonly ttlMs: number;
  private readonly wantPassthrough: boolean;
  private readonly isRoot = process.getuid?.() === 0;
  /** Mounted without default_permissions: this file system checks them (see the header). */
  readonly checksPermissions: boolean;

  constructor(readonly storage: Storage, opts: MirrorOptions = {}) {
    super();
    this.ttlMs = opts.ttlMs ?? 60_000;
    this.wantPassthrough = opts.passthrough ?? true;
    // Only root, allowed to change its file system identity, can act as
    // another user; any other daemon keeps the kernel's checks.
    this.checksPermissions = opts.kernelPermissions !== true && canActAsCallers();
    // The directory itself (storage.root is the /proc link that reaches it).
    const st = lstat(storage.abs(''));
    const root: Node = {
      id: FUSE_ROOT_ID,
      parent: undefined,
      name: '',
      ino: Number(st.ino),
      isDir: true,
      openFds: new Set(),
      unlinked: false,
      searchable: allSearch(st.mode),
    };
    this.nodes = new InodeTable(root);
  }

  attach(session: FuseSession): void {
    this.session = session;
  }

  init(info: { passthrough: boolean }): void {
    this.passthrough = this.wantPassthrough && info.passthrough;
    // The kernel already applied the caller's umask to every mode we get.
    process.umask(0);
  }

  get passthroughActive(): boolean {
    return this.passthrough;
  }

  get nodeCount(): number {
    return this.nodes.size;
  }

  // ---- paths and nodes -----------------------------------------------

  /** Path of a node relative to the storage root. */
  protected rel(node: Node): string {
    if (!node.parent) return '';
    const parts: string[] = [];
    for (let n: Node | undefined = node; n && n.parent; n = n.parent) parts.push(n.name);
    return parts.reverse().join('/');
  }

  protected childRel(parent: Node, name: string): string {
    const p = this.rel(parent);
    return p === '' ? name : `${p}/${name}`;
  }

  protected node(nodeid: number): Node {
    const n = this.nodes.get(nodeid);
    if (!n) throw new DyadError('DYAD_ESTALE', errnos.ESTALE, `unknown node id ${nodeid}`);
    return n;
  }

  protected abs(node: Node): string {
    return this.storage.abs(this.rel(node));
  }

  /** Registers (or finds) the node for a stat'ed child and counts a lookup. */
  protected entryFor(parent: Node, name: string, st: fs.BigIntStats): Entry {
    const ino = Number(st.ino);
    const isDir = (Number(st.mode) & S_IFMT) === S_IFDIR;
    let node = this.byIno.get(ino);
    if (node && node.isDir !== isDir) {
      // The inode number was reused by a file of another type.
      this.byIno.delete(ino);
      node = undefined;
    }
    if (node) {
      if (node.isDir || Number(st.nlink) <= 1) {
        // A rename we did not see: follow the latest name.
        node.parent = parent;
        node.name = name;
      } else if (node.parent !== parent || node.name !== name) {
        node.aliases ??= [];
        if (!node.aliases.some((a) => a.parent === parent && a.name === name)) node.aliases.push({ parent, name });
      }
    } else {
      node = { id: 0, parent, name, ino, isDir, openFds: new Set(), unlinked: false };
      node.id = this.nodes.add(node);
      this.byIno.set(ino, node);
    }
    if (isDir) node.searchable = allSearch(st.mode);
    this.nodes.ref(node.id);
    return { nodeid: node.id, generation: 0, attr: toAttr(st), entryTtlMs: this.entryTtl(parent), attrTtlMs: this.ttlMs };
  }

  /**
   * How long the kernel may keep a name in `dir`. Without
   * default_permissions the kernel checks no directory's search permission
   * on its own: a path it has cached is walked without asking us. A
   * directory some user may not search therefore lets no name of its own
   * be cached, so every walk through it comes to LOOKUP, made as the
   * caller. Names further down need not: walks to them pass that LOOKUP.
   */
  protected entryTtl(dir: Node): number {
    return this.checksPermissions && dir.searchable === false ? 0 : this.ttlMs;
  }

  /**
   * A node for something not (yet) in storage, such as a file published on
   * another node. Its entry and attributes are not cached by the kernel.
   */
  protected virtualEntry(parent: Node, name: string, attr: Attr): Entry {
    const node: Node = { id: 0, parent, name, ino: attr.ino, isDir: (attr.mode & S_IFMT) === S_IFDIR, openFds: new Set(), unlinked: false };
    node.id = this.nodes.add(node);
    this.nodes.ref(node.id);
    return { nodeid: node.id, generation: 0, attr, entryTtlMs: 0, attrTtlMs: 0 };
  }

  /** A virtual node whose file has arrived in storage becomes a normal one. */
  protected materialize(node: Node, st: fs.BigIntStats = lstat(this.abs(node))): void {
    node.ino = Number(st.ino);
    if (!this.byIno.has(node.ino)) this.byIno.set(node.ino, node);
  }

  /** Makes a new file belong to the caller (the daemon runs as root). */
  protected own(ctx: RequestContext, parent: Node, p: string): void {
    // Made with the caller's identity, it is the caller's already.
    if (!this.isRoot || (ctx.uid === 0 && ctx.gid === 0) || this.checksPermissions) return;
    let gid = ctx.gid;
    const pst = fs.statSync(this.abs(parent));
    if (pst.mode & S_ISGID) gid = pst.gid;
    fs.lchownSync(p, ctx.uid, gid);
  }

  // ---- lookups ---------------------------------------------------------

  lookup(ctx: RequestContext, parent: number, name: string): Entry | Refusal | Promise<Entry | Refusal> {
    const dir = this.node(parent);
    // Missing names are the common case for producers and consumers: no
    // exception (and its stack trace) for them.
    const p = this.storage.abs(this.childRel(dir, name));
    // As the caller: a directory on the way it may not search gives EACCES.
    const st = this.maybeAsCaller(ctx, () => lstatIfExists(p));
    if (st === undefined) {
      const caller = callerOf(ctx.pid);
      if (missingChannel.hasSubscribers) missingChannel.publish({ path: this.childRel(dir, name), caller, pid: ctx.pid });
      return this.lookupMissing(ctx, dir, name, caller);
    }
    return this.entryFor(dir, name, st);
  }

  forget(nodeid: number, nlookup: number): void {
    const node = this.nodes.forget(nodeid, nlookup);
    if (!node) return;
    if (this.byIno.get(node.ino) === node) this.byIno.delete(node.ino);
    if (node.backing) {
      this.session?.backingClose(node.backing.id);
      fs.closeSync(node.backing.fd);
      node.backing = undefined;
    }
  }

  getattr(ctx: RequestContext, nodeid: number, fh: number | undefined): AttrReply | Promise<AttrReply> {
    const node = this.node(nodeid);
    const h = fh !== undefined ? this.handles.get(fh) : undefined;
    const fd = h?.fd ?? (node.unlinked ? node.openFds.values().next().value : undefined) ?? node.backing?.fd;
    const st = fd !== undefined ? fstat(fd) : lstat(this.abs(node));
    if (node.isDir) node.searchable = allSearch(st.mode);
    return { attr: toAttr(st), ttlMs: this.ttlMs };
  }

  setattr(ctx: RequestContext, nodeid: number, s: SetAttrIn): AttrReply | Promise<AttrReply> {
    const node = this.node(nodeid);
    const p = this.abs(node);
    const h = s.fh !== undefined ? this.handles.get(s.fh) : undefined;
    // truncate(2) by path while the file is open elsewhere goes through our
    // descriptor, which does not check: the caller must be allowed to write.
    if (this.checksPermissions && s.valid & FATTR_SIZE && !h && !node.unlinked) checkAccess(ctx, p, W_OK, `truncate ${this.rel(node)}`);
    this.maybeAsCaller(ctx, () => this.changeAttrs(node, p, h, s));
    const fd = h?.fd ?? node.backing?.fd;
    const st = fd !== undefined ? fstat(fd) : lstat(p);
    if (node.isDir) this.searchabilityChanged(node, allSearch(st.mode));
    this.afterChange(node);
    return { attr: toAttr(st), ttlMs: this.ttlMs };
  }

  /** A directory closed to some users drops the names the kernel has cached in it (see entryTtl). */
  private searchabilityChanged(dir: Node, searchable: boolean): void {
    const was = dir.searchable;
    dir.searchable = searchable;
    if (!this.checksPermissions || searchable || was === false) return;
    for (const n of this.byIno.values()) {
      if (n.parent === dir) void this.session?.notifyInvalEntry(dir.id, n.name);
    }
  }

  /** Runs a caller's storage calls as the caller when this file system checks permissions. */
  protected maybeAsCaller<T>(ctx: RequestContext, fn: () => T): T {
    return this.checksPermissions ? asCaller(ctx, fn) : fn();
  }

  private changeAttrs(node: Node, p: string, h: Handle | undefined, s: SetAttrIn): void {
    if (s.valid & FATTR_MODE && s.mode !== undefined) {
      if (h) fs.fchmodSync(h.fd, s.mode & 0o7777);
      else fs.chmodSync(p, s.mode & 0o7777);
    }
    if (s.valid & (FATTR_UID | FATTR_GID)) {
      const uid = s.valid & FATTR_UID ? (s.uid ?? -1) : -1;
      const gid = s.valid & FATTR_GID ? (s.gid ?? -1) : -1;
      fs.lchownSync(p, uid, gid);
    }
    if (s.valid & FATTR_SIZE && s.size !== undefined) {
      const fd = h?.fd ?? node.backing?.fd;
      if (fd !== undefined) fs.ftruncateSync(fd, s.size);
      else fs.truncateSync(p, s.size);
    }
    if (s.valid & (FATTR_ATIME | FATTR_MTIME)) {
      const split = (t: bigint | 'now' | undefined, set: boolean): [number, number] => {
        if (!set || t === undefined) return [0, -2]; // UTIME_OMIT
        if (t === 'now') return [0, -1]; // UTIME_NOW
        return [Number(t / 1_000_000_000n), Number(t % 1_000_000_000n)];
      };
      const [as, an] = split(s.atimeNs, (s.valid & FATTR_ATIME) !== 0);
      const [ms, mn] = split(s.mtimeNs, (s.valid & FATTR_MTIME) !== 0);
      const rc = native.utimens(p, as, an, ms, mn, true);
      if (rc < 0) throw new DyadError('DYAD_ESETATTR', -rc, `utimens ${this.rel(node)} failed`);
    }
  }

  readlink(ctx: RequestContext, nodeid: number): string {
    return fs.readlinkSync(this.abs(this.node(nodeid)));
  }

  // ---- namespace changes -------------------------------------------

  symlink(ctx: RequestContext, parent: number, name: string, target: string): Entry {
    const dir = this.node(parent);
    const p = this.storage.abs(this.childRel(dir, name));
    this.maybeAsCaller(ctx, () => fs.symlinkSync(target, p));
    this.own(ctx, dir, p);
    return this.entryFor(dir, name, lstat(p));
  }

  mknod(ctx: RequestContext, parent: number, name: string, mode: number, rdev: number): Entry {
    const dir = this.node(parent);
    const p = this.storage.abs(this.childRel(dir, name));
    if ((mode & S_IFMT) !== 0o100000) {
      // Node has no mknod(2); regular files are all a DMD holds.
      throw new DyadError('DYAD_EPERM', errnos.EPERM, `${name}: only regular files can be created with mknod`);
    }
    fs.closeSync(this.maybeAsCaller(ctx, () => fs.openSync(p, O_CREAT | O_EXCL | O_WRONLY, mode & 0o7777)));
    this.own(ctx, dir, p);
    return this.entryFor(dir, name, lstat(p));
  }

  mkdir(ctx: RequestContext, parent: number, name: string, mode: number): Entry {
    const dir = this.node(parent);
    const p = this.storage.abs(this.childRel(dir, name));
    this.maybeAsCaller(ctx, () => fs.mkdirSync(p, { mode: mode & 0o7777 }));
    this.own(ctx, dir, p);
    return this.entryFor(dir, name, lstat(p));
  }

  /**
   * Bookkeeping for a name that goes away: the node is unlinked with its
   * last name, otherwise it moves to one of its other names.
   */
  private dropName(parent: Node, name: string, st: fs.BigIntStats): void {
    const node = this.byIno.get(Number(st.ino));
    if (!node) return;
    if (node.isDir || Number(st.nlink) <= 1) {
      node.unlinked = true;
      this.byIno.delete(node.ino);
      return;
    }
    if (node.parent === parent && node.name === name) {
      const next = node.aliases?.shift();
      if (next) {
        node.parent = next.parent;
        node.name = next.name;
      }
    } else {
      node.aliases = node.aliases?.filter((a) => a.parent !== parent || a.name !== name);
    }
  }

  unlink(ctx: RequestContext, parent: number, name: string): void | Promise<void> {
    return this.removeName(this.node(parent), name, (p) => this.maybeAsCaller(ctx, () => fs.unlinkSync(p)));
  }

  rmdir(ctx: RequestContext, parent: number, name: string): void | Promise<void> {
    return this.removeName(this.node(parent), name, (p) => this.maybeAsCaller(ctx, () => fs.rmdirSync(p)));
  }

  private removeName(dir: Node, name: string, op: (p: string) => void): void | Promise<void> {
    const rel = this.childRel(dir, name);
    const p = this.storage.abs(rel);
    let st: fs.BigIntStats | undefined;
    try {
      st = lstat(p);
    } catch {
      /* op reports the error */
    }
    op(p);
    if (st) this.dropName(dir, name, st);
    return this.afterRemove(rel);
  }

  rename(ctx: RequestContext, parent: number, name: string, newParent: number, newName: string, flags: number): void | Promise<void> {
    const from = this.node(parent);
    const to = this.node(newParent);
    const src = this.storage.abs(this.childRel(from, name));
    const dst = this.storage.abs(this.childRel(to, newName));
    if (flags & RENAME_EXCHANGE) {
      throw new DyadError('DYAD_EINVAL', errnos.EINVAL, 'RENAME_EXCHANGE is not supported');
    }
    // As the caller: the answer must not tell it about names it may not see.
    if (flags & RENAME_NOREPLACE && this.maybeAsCaller(ctx, () => fs.existsSync(dst))) {
      throw new DyadError('DYAD_EEXIST', errnos.EEXIST, `${newName} exists`);
    }
    const st = lstat(src);
    let replaced: fs.BigIntStats | undefined;
    try {
      replaced = lstat(dst);
    } catch {
      /* no target */
    }
    this.maybeAsCaller(ctx, () => fs.renameSync(src, dst));
    if (replaced && replaced.ino !== st.ino) this.dropName(to, newName, replaced);
    const node = this.byIno.get(Number(st.ino));
    // The kernel moves its cached name, with the time it may keep it: into
    // a directory closed to some users, it must not keep it (entryTtl).
    if (this.entryTtl(to) === 0) void this.session?.notifyInvalEntry(to.id, newName);
    if (node) {
      const alias = node.aliases?.find((a) => a.parent === from && a.name === name);
      if (alias) {
        alias.parent = to;
        alias.name = newName;
      } else {
        node.parent = to;
        node.name = newName;
      }
    }
    return this.afterRename(this.childRel(from, name), this.childRel(to, newName), node);
  }

  link(ctx: RequestContext, nodeid: number, newParent: number, newName: string): Entry {
    const node = this.node(nodeid);
    const to = this.node(newParent);
    const dst = this.storage.abs(this.childRel(to, newName));
    const src = this.abs(node);
    this.maybeAsCaller(ctx, () => fs.linkSync(src, dst));
    return this.entryFor(to, newName, lstat(dst));
  }

  // ---- files ----------------------------------------------------------

  /** `opened`: a read-write descriptor of the file the caller already has (and hands over). */
  private backingFor(node: Node, p: string, opened?: number): number {
    if (node.backing) {
      if (opened !== undefined) fs.closeSync(opened);
      node.backing.refs++;
      return node.backing.id;
    }
    let fd: number;
    if (opened !== undefined) {
      fd = opened;
    } else {
      // O_NOATIME: the daemon reads through it (a digest at publication)
      // and must not touch the atime. The kernel opens its own file for
      // each passthrough open, with the caller's flags, so the caller's
      // reads still do.
      try {
        fd = fs.openSync(p, O_RDWR | O_NOFOLLOW | O_NOATIME);
      } catch {
        fd = fs.openSync(p, O_RDONLY | O_NOFOLLOW | O_NOATIME);
      }
    }
    try {
      const id = this.session!.backingOpen(fd);
      node.backing = { fd, id, refs: 1 };
      return id;
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  private openHandle(ctx: RequestContext, node: Node, p: string, flags: number, created: boolean, opened?: number): OpenReply {
    const acc = flags & O_ACCMODE;
    const writable = acc !== O_RDONLY;
    let fh: number;
    let fd: number;
    let reply: OpenReply;
    if (this.passthrough) {
      if (flags & O_TRUNC && !created) fs.truncateSync(p, 0);
      const backingId = this.backingFor(node, p, opened);
      fh = this.nextFh++;
      fd = node.backing!.fd;
      this.handles.set(fh, { fd, node, flags, passthrough: true, writable, opener: ctx.pid });
      reply = { fh, backingId, noFlush: !writable };
    } else {
      const keep = acc | (flags & (O_APPEND | O_TRUNC | O_DIRECT | O_SYNC | O_DSYNC | O_NOATIME));
      fd = fs.openSync(p, (created ? keep & ~O_TRUNC : keep) | O_NOFOLLOW);
      fh = this.nextFh++;
      node.openFds.add(fd);
      this.handles.set(fh, { fd, node, flags, passthrough: false, writable, opener: ctx.pid });
      // Like libfuse's auto_cache: keep the kernel's pages of this file when
      // storage shows no change since they were cached. Writes through the
      // mount keep those pages current; a change behind our back does not.
      const st = fstat(fd);
      const stamp = `${st.mtimeNs}:${st.size}`;
      const keepCache = node.cacheStamp === stamp;
      node.cacheStamp = stamp;
      reply = { fh, noFlush: !writable, directIo: (flags & O_DIRECT) !== 0, keepCache };
    }
    if (writable) this.afterWriteOpen(node, fd);
    return reply;
  }

  open(ctx: RequestContext, nodeid: number, flags: number): OpenReply | Promise<OpenReply> {
    const node = this.node(nodeid);
    this.checkOpen(ctx, node, flags);
    return this.openNode(ctx, node, flags);
  }

  /** An open already checked (checkOpen). */
  protected openNode(ctx: RequestContext, node: Node, flags: number): OpenReply {
    return this.openHandle(ctx, node, this.abs(node), flags, false);
  }

  /**
   * Refuses an open the caller may not make (when this file system checks
   * permissions). The descriptor behind the open is the daemon's (shared
   * per inode with passthrough), so the check is made apart, as the
   * caller. A subclass that acts before opening (the DMD withdraws a
   * published file opened for writing) checks first, then calls openNode.
   */
  protected checkOpen(ctx: RequestContext, node: Node, flags: number): void {
    if (this.checksPermissions) checkAccess(ctx, this.abs(node), accessMask(flags), `open ${this.rel(node)}`);
  }

  create(ctx: RequestContext, parent: number, name: string, mode: number, flags: number): CreateReply {
    const dir = this.node(parent);
    const p = this.storage.abs(this.childRel(dir, name));
    // Create with the caller's flags (O_EXCL decides EEXIST). With
    // passthrough (root) the descriptor is opened read-write and becomes the
    // backing file; otherwise the handle is opened the normal way.
    // (O_NOATIME as in backingFor; refused for a file someone else owns, a
    // name created meanwhile by another: then without it.)
    const access = this.passthrough ? O_RDWR | O_NOATIME : O_WRONLY;
    const how = O_CREAT | (flags & (O_EXCL | O_TRUNC)) | O_NOFOLLOW;
    let fd: number | undefined = this.maybeAsCaller(ctx, () => {
      try {
        return fs.openSync(p, how | access, mode & 0o7777);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EPERM' || !(access & O_NOATIME)) throw err;
        return fs.openSync(p, how | (access & ~O_NOATIME), mode & 0o7777);
      }
    });
    if (!this.passthrough) {
      fs.closeSync(fd);
      fd = undefined;
    }
    let entry: Entry;
    try {
      this.own(ctx, dir, p);
      entry = this.entryFor(dir, name, fd === undefined ? lstat(p) : fstat(fd));
    } catch (err) {
      if (fd !== undefined) fs.closeSync(fd);
      throw err;
    }
    const node = this.nodes.get(entry.nodeid)!;
    try {
      return { entry, open: this.openHandle(ctx, node, p, flags, true, fd) };
    } catch (err) {
      this.forget(entry.nodeid, 1);
      throw err;
    }
  }

  read(ctx: RequestContext, nodeid: number, fh: number, offset: number, size: number): FdSlice {
    const h = this.handle(fh);
    return { fd: h.fd, offset, size };
  }

  write(ctx: RequestContext, nodeid: number, fh: number, offset: number, data: Buffer): number {
    const h = this.handle(fh);
    return fs.writeSync(h.fd, data, 0, data.length, offset);
  }

  flush(ctx: RequestContext, nodeid: number, fh: number): void | Promise<void> {
    this.handle(fh);
  }

  release(ctx: RequestContext, nodeid: number, fh: number): void | Promise<void> {
    const h = this.handles.get(fh);
    if (!h) return;
    this.handles.delete(fh);
    const node = h.node;
    // How the writer left the file, through its descriptor before that may
    // close: cheaper than walking the path afterwards, and right after a rename.
    const st = h.writable && !h.settled ? fstat(h.fd) : undefined;
    if (h.passthrough) {
      // The backing registration stays until FORGET while other opens use it.
      if (node.backing && --node.backing.refs === 0) {
        this.session?.backingClose(node.backing.id);
        fs.closeSync(node.backing.fd);
        node.backing = undefined;
      }
    } else {
      // Our own writes went through the kernel's cache, which stays valid.
      if (st) node.cacheStamp = `${st.mtimeNs}:${st.size}`;
      node.openFds.delete(h.fd);
      fs.closeSync(h.fd);
    }
    if (st) return this.afterWriteClose(node, h, st);
  }

  fsync(ctx: RequestContext, nodeid: number, fh: number, datasync: boolean): void {
    const h = this.handle(fh);
    if (datasync) fs.fdatasyncSync(h.fd);
    else fs.fsyncSync(h.fd);
  }

  fallocate(ctx: RequestContext, nodeid: number, fh: number, offset: number, length: number, mode: number): void {
    const h = this.handle(fh);
    const rc = native.fallocate(h.fd, mode, offset, length);
    if (rc < 0) throw new DyadError('DYAD_EFALLOCATE', -rc, `fallocate failed`);
  }

  lseek(ctx: RequestContext, nodeid: number, fh: number, offset: number, whence: number): number {
    const h = this.handle(fh);
    const rc = native.lseek(h.fd, offset, whence);
    if (rc < 0) throw new DyadError('DYAD_ELSEEK', -rc, `lseek failed`);
    return rc;
  }

  protected handle(fh: number): Handle {
    const h = this.handles.get(fh);
    if (!h) throw new DyadError('DYAD_EBADF', errnos.EBADF, `unknown file handle ${fh}`);
    return h;
  }

  // ---- directories ----------------------------------------------------

  opendir(ctx: RequestContext, nodeid: number, flags?: number): OpenReply | Promise<OpenReply> {
    const node = this.node(nodeid);
    const p = this.abs(node);
    if (this.checksPermissions) checkAccess(ctx, p, R_OK, `opendir ${this.rel(node) || '/'}`);
    const entries: ListedEntry[] = [
      { name: '.', mode: S_IFDIR, ino: node.ino },
      { name: '..', mode: S_IFDIR, ino: node.parent?.ino ?? node.ino },
    ];
    // With the storage's inode numbers: plain READDIR (the kernel's choice
    // after the first page of a large directory) gives no others.
    const listed = native.readDir(p);
    if (typeof listed === 'number') throw new DyadError('DYAD_EREADDIR', -listed, `cannot list ${this.rel(node) || '/'}`);
    for (let i = 0; i < listed.names.length; i++) {
      const name = listed.names[i]!;
      if (this.hidden(name)) continue;
      entries.push({ name, mode: listed.types[i]! << 12, ino: listed.inos[i]! });
    }
    const open = (): OpenReply => {
      const fh = this.nextFh++;
      this.dirs.set(fh, { node, entries });
      return { fh };
    };
    const extra = this.extraEntries(node);
    if (!extra) return open();
    return extra.then((more) => {
      const local = new Set(entries.map((e) => e.name));
      for (const e of more) if (!local.has(e.name)) entries.push(e);
      return open();
    });
  }

  readdir(ctx: RequestContext, nodeid: number, fh: number, offset: number, plus: boolean): DirEntry[] {
    const d = this.dirs.get(fh);
    if (!d) throw new DyadError('DYAD_EBADF', errnos.EBADF, `unknown directory handle ${fh}`);
    const out: DirEntry[] = [];
    // The packer stops at the first entry that does not fit; offering a
    // page's worth is enough.
    const end = Math.min(d.entries.length, offset + 512);
    for (let i = offset; i < end; i++) {
      const e = d.entries[i]!;
      const de: DirEntry = { name: e.name, mode: e.mode, ino: e.ino || 0xffff_ffff, nextOffset: i + 1 };
      if (plus && e.name !== '.' && e.name !== '..') de.entry = () => this.readdirEntry(d.node, e);
      out.push(de);
    }
    return out;
  }

  /** READDIRPLUS: the entry of one child, as a LOOKUP would give it. */
  protected readdirEntry(dir: Node, e: ListedEntry): Entry {
    try {
      return this.entryFor(dir, e.name, lstat(this.storage.abs(this.childRel(dir, e.name))));
    } catch {
      // Gone since opendir: a zero node id tells the kernel to skip it.
      return { nodeid: 0, generation: 0, attr: zeroAttr(), entryTtlMs: 0, attrTtlMs: 0 };
    }
  }

  releasedir(ctx: RequestContext, nodeid: number, fh: number): void {
    this.dirs.delete(fh);
  }

  fsyncdir(ctx: RequestContext, nodeid: number): void {
    const fd = fs.openSync(this.abs(this.node(nodeid)), O_RDONLY);
    try {
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  }

  statfs(): StatFs {
    return this.storage.statfs();
  }

  access(ctx: RequestContext, nodeid: number, mask: number): void {
    const node = this.node(nodeid);
    if (this.checksPermissions && ctx.uid !== 0) return checkAccess(ctx, this.abs(node), mask, `access ${this.rel(node) || '/'}`);
    fs.accessSync(this.abs(node), mask);
  }

  // ---- hooks for the DMD layer ------------------------------------------

  /** Names in storage that the mount does not show. */
  protected hidden(name: string): boolean {
    return false;
  }

  /** A name missing from storage: plain mirrors say ENOENT. */
  protected lookupMissing(ctx: RequestContext, dir: Node, name: string, caller: Caller): Entry | Refusal | Promise<Entry | Refusal> {
    return NO_ENTRY;
  }

  /** Entries to list beside those in storage (e.g. published remotely). */
  protected extraEntries(dir: Node): Promise<ListedEntry[]> | undefined {
    return undefined;
  }

  /** A handle opened for writing, on the storage file behind `fd`. */
  protected afterWriteOpen(node: Node, fd: number): void {}

  /** The last close of a handle opened for writing; `st`: the file as it was left. */
  protected afterWriteClose(node: Node, h: Handle, st: fs.BigIntStats): void | Promise<void> {}

  protected afterChange(node: Node): void {}

  protected afterRemove(rel: string): void | Promise<void> {}

  protected afterRename(fromRel: string, toRel: string, node: Node | undefined): void | Promise<void> {}
}

function zeroAttr() {
  return { ino: 0, size: 0, blocks: 0, atimeNs: 0n, mtimeNs: 0n, ctimeNs: 0n, mode: 0, nlink: 0, uid: 0, gid: 0, rdev: 0, blksize: 0 };
}

/** What an open with `flags` needs: execve's open needs execute permission only. */
function accessMask(flags: number): number {
  if (flags & FMODE_EXEC) return X_OK;
  const acc = flags & O_ACCMODE;
  let mask = acc === O_WRONLY ? W_OK : acc === O_RDWR ? R_OK | W_OK : R_OK;
  if (flags & O_TRUNC) mask |= W_OK;
  return mask;
}

/** Do all three classes (owner, group, others) have search permission? */
function allSearch(mode: bigint | number): boolean {
  return (Number(mode) & 0o111) === 0o111;
}
