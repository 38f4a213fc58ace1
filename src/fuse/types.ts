/**
 * What a file system implements to be served by a FuseSession.
 *
 * Every handler may return its result directly or as a Promise: a Promise is
 * a deferred reply and costs no thread while it waits. A handler fails by
 * throwing (or rejecting with) anything that carries an errno or a Node
 * error code (see errnoOf in src/errors.ts). Handlers that wait for a long
 * time should watch ctx.signal: it aborts when the kernel interrupts the
 * request (the caller got a signal), and the handler should then fail with
 * EINTR.
 */

export interface RequestContext {
  readonly unique: bigint;
  readonly nodeid: number;
  readonly uid: number;
  readonly gid: number;
  /** Thread id of the calling thread (0 when the kernel could not map it). */
  readonly pid: number;
  /** Aborted when the kernel sends INTERRUPT for this request. */
  readonly signal: AbortSignal;
}

export interface Attr {
  ino: number;
  size: number;
  blocks: number;
  atimeNs: bigint;
  mtimeNs: bigint;
  ctimeNs: bigint;
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  rdev: number;
  blksize: number;
}

export interface AttrReply {
  attr: Attr;
  /** How long the kernel may cache these attributes. */
  ttlMs: number;
}

export interface Entry {
  /** 0 for a negative entry (the kernel caches the absence for entryTtlMs). */
  nodeid: number;
  generation: number;
  attr: Attr;
  entryTtlMs: number;
  attrTtlMs: number;
}

export interface OpenReply {
  fh: number;
  directIo?: boolean;
  keepCache?: boolean;
  noFlush?: boolean;
  nonSeekable?: boolean;
  cacheDir?: boolean;
  parallelDirectWrites?: boolean;
  /** A backing id from FuseSession.backingOpen(): the kernel serves I/O itself. */
  backingId?: number;
}

export interface CreateReply {
  entry: Entry;
  open: OpenReply;
}

export interface SetAttrIn {
  /** FATTR_* bits saying which fields are set. */
  valid: number;
  fh?: number;
  size?: number;
  mode?: number;
  uid?: number;
  gid?: number;
  /** Absolute times; 'now' for *_NOW. */
  atimeNs?: bigint | 'now';
  mtimeNs?: bigint | 'now';
}

export interface StatFs {
  blocks: number;
  bfree: number;
  bavail: number;
  files: number;
  ffree: number;
  bsize: number;
  namelen: number;
  frsize: number;
}

export interface DirEntry {
  name: string;
  /** st_mode (only the type bits matter for READDIR). */
  mode: number;
  ino: number;
  /** Offset of the entry after this one: what the next READDIR will pass. */
  nextOffset: number;
  /**
   * READDIRPLUS only: the full entry. Called only for entries that fit in
   * the reply (and never for "." and ".."), because each call is a lookup
   * the kernel will later FORGET.
   */
  entry?: () => Entry;
}

/** A READ answered from a file descriptor, without copying through JS. */
export interface FdSlice {
  fd: number;
  offset: number;
  size: number;
}

export type MaybePromise<T> = T | Promise<T>;

/**
 * A routine "no" that LOOKUP may return instead of throwing: ENOENT for a
 * name that does not exist, which every create of a new name gets. V8 never
 * optimises a function that always leaves by a throw (its tier-up budget is
 * only checked on return), so on a producer the whole create-side lookup
 * chain used to run in the interpreter.
 */
export class Refusal {
  constructor(readonly errno: number) {}
}

export interface FileSystem {
  /**
   * The file system checks permissions itself, so the mount is made without
   * default_permissions (the kernel then checks only execute bits and asks
   * with ACCESS for access(2) and chdir).
   */
  readonly checksPermissions?: boolean;
  init?(info: { passthrough: boolean; minor: number }): void;
  destroy?(): void;
  lookup(ctx: RequestContext, parent: number, name: string): MaybePromise<Entry | Refusal>;
  forget(nodeid: number, nlookup: number): void;
  getattr(ctx: RequestContext, nodeid: number, fh: number | undefined): MaybePromise<AttrReply>;
  setattr(ctx: RequestContext, nodeid: number, changes: SetAttrIn): MaybePromise<AttrReply>;
  readlink(ctx: RequestContext, nodeid: number): MaybePromise<string>;
  symlink(ctx: RequestContext, parent: number, name: string, target: string): MaybePromise<Entry>;
  mknod(ctx: RequestContext, parent: number, name: string, mode: number, rdev: number): MaybePromise<Entry>;
  mkdir(ctx: RequestContext, parent: number, name: string, mode: number): MaybePromise<Entry>;
  unlink(ctx: RequestContext, parent: number, name: string): MaybePromise<void>;
  rmdir(ctx: RequestContext, parent: number, name: string): MaybePromise<void>;
  rename(
    ctx: RequestContext,
    parent: number,
    name: string,
    newParent: number,
    newName: string,
    flags: number,
  ): MaybePromise<void>;
  link(ctx: RequestContext, nodeid: number, newParent: number, newName: string): MaybePromise<Entry>;
  open(ctx: RequestContext, nodeid: number, flags: number): MaybePromise<OpenReply>;
  create(ctx: RequestContext, parent: number, name: string, mode: number, flags: number): MaybePromise<CreateReply>;
  read(ctx: RequestContext, nodeid: number, fh: number, offset: number, size: number): MaybePromise<Uint8Array | FdSlice>;
  write(ctx: RequestContext, nodeid: number, fh: number, offset: number, data: Buffer, flags: number): MaybePromise<number>;
  flush(ctx: RequestContext, nodeid: number, fh: number): MaybePromise<void>;
  release(ctx: RequestContext, nodeid: number, fh: number, flags: number): MaybePromise<void>;
  fsync(ctx: RequestContext, nodeid: number, fh: number, datasync: boolean): MaybePromise<void>;
  opendir(ctx: RequestContext, nodeid: number, flags: number): MaybePromise<OpenReply>;
  readdir(ctx: RequestContext, nodeid: number, fh: number, offset: number, plus: boolean): MaybePromise<DirEntry[]>;
  releasedir(ctx: RequestContext, nodeid: number, fh: number): MaybePromise<void>;
  fsyncdir?(ctx: RequestContext, nodeid: number, fh: number, datasync: boolean): MaybePromise<void>;
  statfs(ctx: RequestContext, nodeid: number): MaybePromise<StatFs>;
  access(ctx: RequestContext, nodeid: number, mask: number): MaybePromise<void>;
  fallocate?(ctx: RequestContext, nodeid: number, fh: number, offset: number, length: number, mode: number): MaybePromise<void>;
  lseek?(ctx: RequestContext, nodeid: number, fh: number, offset: number, whence: number): MaybePromise<number>;
}
