/**
 * A FUSE session: reads kernel requests from the device, negotiates INIT,
 * decodes each request, calls the FileSystem and writes the reply.
 *
 * Replies may come later: a handler that returns a Promise leaves its
 * request pending at no cost but a map entry, and INTERRUPT for a pending
 * request aborts its ctx.signal so the handler can give up with EINTR.
 * Everything runs on the Node main thread; the device is watched by uv_poll
 * in the native addon.
 */
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import diagnostics from 'node:diagnostics_channel';
import {
  FATTR_ATIME,
  FATTR_ATIME_NOW,
  FATTR_FH,
  FATTR_GID,
  FATTR_MODE,
  FATTR_MTIME,
  FATTR_MTIME_NOW,
  FATTR_SIZE,
  FATTR_UID,
  FUSE_FSYNC_FDATASYNC,
  FUSE_GETATTR_FH,
  FUSE_KERNEL_MINOR_VERSION,
  FUSE_KERNEL_VERSION,
  IN_HEADER_SIZE,
  INIT_OUT_SIZE,
  Init,
  MAX_WRITE,
  Notify,
  OUT_HEADER_SIZE,
  Op,
  REQUEST_BUFFER_SIZE,
  opNames,
} from './abi.js';
import {
  DirentPacker,
  attrOut,
  createOut,
  entryOut,
  openOut,
  statfsOut,
  u64Out,
  writeOut,
} from './encode.js';
import { native, type FuseDeviceHandle } from './native.js';
import { Refusal, type AttrReply, type Entry, type FdSlice, type FileSystem, type RequestContext, type SetAttrIn } from './types.js';
import { DyadError, errnoOf, errnos } from '../errors.js';

/** Published for every request when someone subscribes (debugging, tests). */
export const requestChannel = diagnostics.channel('dyad-fs:fuse:request');

export interface SessionOptions {
  /** Ask for kernel passthrough (needs CAP_SYS_ADMIN and a kernel offering it). */
  passthrough?: boolean;
  /** Microseconds to keep polling the device after a request (0: off). */
  spinUs?: number;
}

export interface NegotiatedInit {
  major: number;
  minor: number;
  flags: bigint;
  passthrough: boolean;
  maxWrite: number;
  maxPages: number;
}

class Context implements RequestContext {
  private controller?: AbortController;
  constructor(
    readonly unique: bigint,
    readonly nodeid: number,
    readonly uid: number,
    readonly gid: number,
    readonly pid: number,
  ) {}
  get signal(): AbortSignal {
    this.controller ??= new AbortController();
    return this.controller.signal;
  }
  interrupt(): void {
    this.controller ??= new AbortController();
    this.controller.abort(new DyadError('DYAD_EINTR', errnos.EINTR, 'interrupted by the caller'));
  }
}

function isPromise<T>(v: T | Promise<T>): v is Promise<T> {
  return typeof (v as { then?: unknown } | null)?.then === 'function';
}

function isFdSlice(v: Uint8Array | FdSlice): v is FdSlice {
  return !(v instanceof Uint8Array);
}

function u64(buf: Buffer, off: number): number {
  return buf.readUInt32LE(off) + buf.readUInt32LE(off + 4) * 0x1_0000_0000;
}

function cstring(buf: Buffer, off: number): [string, number] {
  let end = buf.indexOf(0, off);
  if (end < 0) end = buf.length;
  return [buf.toString('utf8', off, end), end + 1];
}

export class FuseSession extends EventEmitter {
  private device?: FuseDeviceHandle;
  private readonly pending = new Map<bigint, Context>();
  private initInfo?: NegotiatedInit;
  /** Requests received per opcode, for `kill -USR1` statistics and benchmarks. */
  readonly counts = new Uint32Array(64);
  private closed = false;

  constructor(
    readonly fd: number,
    private readonly fs: FileSystem,
    private readonly opts: SessionOptions = {},
  ) {
    super();
  }

  /** Starts serving; resolves once the kernel's INIT has been answered. */
  start(): Promise<NegotiatedInit> {
    const ready = new Promise<NegotiatedInit>((resolve, reject) => {
      this.once('init', resolve);
      this.once('closed', (errno: number) =>
        reject(new DyadError('DYAD_EFUSE', errno, `FUSE device closed before INIT (errno ${errno})`)),
      );
    });
    this.device = new native.FuseDevice(
      this.fd,
      REQUEST_BUFFER_SIZE,
      (buf) => this.onRequest(buf),
      (errno) => this.onDeviceError(errno),
    );
    if (this.opts.spinUs) this.device.setSpin(this.opts.spinUs);
    const rc = this.device.start();
    if (rc < 0) throw new DyadError('DYAD_EFUSE', -rc, `cannot watch /dev/fuse (errno ${-rc})`);
    return ready;
  }

  get negotiated(): NegotiatedInit | undefined {
    return this.initInfo;
  }

  /** Non-zero request counts by opcode name. */
  stats(): Record<string, number> {
    const out: Record<string, number> = {};
    this.counts.forEach((n, op) => {
      if (n) out[opNames[op] ?? String(op)] = n;
    });
    return out;
  }

  get pendingCount(): number {
    return this.pending.size;
  }

  /** Registers an open file with the kernel for passthrough I/O. */
  backingOpen(fd: number): number {
    const id = this.dev().backingOpen(fd);
    if (id < 0) throw new DyadError('DYAD_EPASSTHROUGH', -id, `passthrough backing open failed (errno ${-id})`);
    return id;
  }

  backingClose(id: number): void {
    this.dev().backingClose(id);
  }

  /**
   * Asks the kernel to drop a cached name. Written from the thread pool,
   * because the kernel takes the directory lock to do it, and a request of
   * ours that is pending in that directory may hold it.
   */
  notifyInvalEntry(parent: number, name: string): Promise<void> {
    const nameBuf = Buffer.from(name);
    const body = Buffer.alloc(16);
    body.writeBigUInt64LE(BigInt(parent), 0);
    body.writeUInt32LE(nameBuf.length, 8);
    return this.notify(Notify.INVAL_ENTRY, [body, nameBuf, Buffer.alloc(1)]);
  }

  /** Asks the kernel to drop cached attributes (and data, len > 0) of a node. */
  notifyInvalInode(nodeid: number, offset = 0, length = 0): Promise<void> {
    const body = Buffer.alloc(24);
    body.writeBigUInt64LE(BigInt(nodeid), 0);
    body.writeBigInt64LE(BigInt(offset), 8);
    body.writeBigInt64LE(BigInt(length), 16);
    return this.notify(Notify.INVAL_INODE, [body]);
  }

  private notify(code: number, parts: Buffer[]): Promise<void> {
    const len = OUT_HEADER_SIZE + parts.reduce((n, b) => n + b.length, 0);
    const hdr = Buffer.alloc(OUT_HEADER_SIZE);
    hdr.writeUInt32LE(len, 0);
    hdr.writeInt32LE(code, 4);
    return new Promise((resolve) => {
      fs.writev(this.fd, [hdr, ...parts], (err) => {
        // ENOENT: nothing cached under that name, which is what we wanted.
        if (err && err.code !== 'ENOENT' && !this.closed) this.emit('warning', err);
        resolve();
      });
    });
  }

  /** Stops reading; pending requests are abandoned (the mount is going away). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.device?.stop();
    for (const ctx of this.pending.values()) ctx.interrupt();
    this.pending.clear();
  }

  private dev(): FuseDeviceHandle {
    if (!this.device) throw new DyadError('DYAD_EFUSE', errnos.EBADF, 'FUSE session not started');
    return this.device;
  }

  private onDeviceError(errno: number): void {
    const wasClosed = this.closed;
    this.close();
    if (!wasClosed || errno !== errnos.ENODEV) this.emit('closed', errno);
  }

  // ---- replies -------------------------------------------------------

  private send(unique: bigint, error: number, payload?: Uint8Array): void {
    const hdr = Buffer.allocUnsafe(OUT_HEADER_SIZE);
    hdr.writeUInt32LE(OUT_HEADER_SIZE + (payload ? payload.length : 0), 0);
    hdr.writeInt32LE(-error, 4);
    hdr.writeBigUInt64LE(unique, 8);
    const rc = this.device ? this.device.reply(payload && payload.length ? [hdr, payload] : [hdr]) : 0;
    // ENOENT: the request was interrupted and the kernel no longer waits.
    if (rc < 0 && rc !== -errnos.ENOENT && !this.closed) {
      this.emit('warning', new DyadError('DYAD_EFUSE', -rc, `reply write failed (errno ${-rc})`));
    }
  }

  private fail(unique: bigint, err: unknown, op: number): void {
    const errno = errnoOf(err);
    if (errno === errnos.EIO && !(err instanceof DyadError)) {
      // An unexpected exception: say so instead of hiding it behind EIO.
      this.emit('warning', new Error(`${opNames[op] ?? op} failed: ${String((err as Error)?.stack ?? err)}`));
    }
    this.send(unique, errno);
  }

  /**
   * Runs a handler and encodes its result, now or when its Promise settles.
   * The request stays interruptible while it is pending. A Refusal (only
   * LOOKUP returns one) is answered with its errno, as a throw would be.
   */
  private settle<T>(ctx: Context, op: number, run: () => T | Refusal | Promise<T | Refusal>, encode: (v: T) => Uint8Array | undefined): void {
    let result: T | Refusal | Promise<T | Refusal>;
    try {
      result = run();
    } catch (err) {
      this.fail(ctx.unique, err, op);
      return;
    }
    if (!isPromise(result)) {
      if (result instanceof Refusal) this.send(ctx.unique, result.errno);
      else this.send(ctx.unique, 0, encode(result));
      return;
    }
    this.pending.set(ctx.unique, ctx);
    result.then(
      (v) => {
        if (!this.pending.delete(ctx.unique)) return;
        if (v instanceof Refusal) this.send(ctx.unique, v.errno);
        else this.send(ctx.unique, 0, encode(v));
      },
      (err: unknown) => {
        if (this.pending.delete(ctx.unique)) this.fail(ctx.unique, err, op);
      },
    );
  }

  // ---- dispatch ------------------------------------------------------

  private onRequest(buf: Buffer): void {
    const opcode = buf.readUInt32LE(4);
    this.counts[opcode & 63]!++;
    const unique = buf.readBigUInt64LE(8);
    const nodeid = u64(buf, 16);
    const ctx = new Context(unique, nodeid, buf.readUInt32LE(24), buf.readUInt32LE(28), buf.readUInt32LE(32));
    if (requestChannel.hasSubscribers) requestChannel.publish({ op: opNames[opcode] ?? opcode, nodeid, unique, pid: ctx.pid });
    if (!this.initInfo && opcode !== Op.INIT) {
      this.send(unique, errnos.EIO);
      return;
    }
    try {
      this.dispatch(opcode, ctx, buf, IN_HEADER_SIZE);
    } catch (err) {
      this.fail(unique, err, opcode);
    }
  }

  private dispatch(op: number, ctx: Context, b: Buffer, p: number): void {
    const fsys = this.fs;
    const n = ctx.nodeid;
    const entry = (e: Entry) => entryOut(e);
    const attr = (a: AttrReply) => attrOut(a.attr, a.ttlMs);
    const none = () => undefined;
    switch (op) {
      case Op.INIT:
        return this.init(ctx, b, p);
      case Op.LOOKUP: {
        const [name] = cstring(b, p);
        return this.settle(ctx, op, () => fsys.lookup(ctx, n, name), entry);
      }
      case Op.FORGET:
        fsys.forget(n, u64(b, p));
        return;
      case Op.BATCH_FORGET: {
        const count = b.readUInt32LE(p);
        for (let i = 0, q = p + 8; i < count; i++, q += 16) fsys.forget(u64(b, q), u64(b, q + 8));
        return;
      }
      case Op.GETATTR: {
        const flags = b.readUInt32LE(p);
        const fh = flags & FUSE_GETATTR_FH ? u64(b, p + 8) : undefined;
        return this.settle(ctx, op, () => fsys.getattr(ctx, n, fh), attr);
      }
      case Op.SETATTR:
        return this.settle(ctx, op, () => fsys.setattr(ctx, n, decodeSetattr(b, p)), attr);
      case Op.READLINK:
        return this.settle(ctx, op, () => fsys.readlink(ctx, n), (s) => Buffer.from(s));
      case Op.SYMLINK: {
        const [name, q] = cstring(b, p);
        const [target] = cstring(b, q);
        return this.settle(ctx, op, () => fsys.symlink(ctx, n, name, target), entry);
      }
      case Op.MKNOD: {
        const mode = b.readUInt32LE(p);
        const rdev = b.readUInt32LE(p + 4);
        const [name] = cstring(b, p + 16);
        return this.settle(ctx, op, () => fsys.mknod(ctx, n, name, mode, rdev), entry);
      }
      case Op.MKDIR: {
        const mode = b.readUInt32LE(p);
        const [name] = cstring(b, p + 8);
        return this.settle(ctx, op, () => fsys.mkdir(ctx, n, name, mode), entry);
      }
      case Op.UNLINK: {
        const [name] = cstring(b, p);
        return this.settle(ctx, op, () => fsys.unlink(ctx, n, name), none);
      }
      case Op.RMDIR: {
        const [name] = cstring(b, p);
        return this.settle(ctx, op, () => fsys.rmdir(ctx, n, name), none);
      }
      case Op.RENAME:
      case Op.RENAME2: {
        const newParent = u64(b, p);
        const flags = op === Op.RENAME2 ? b.readUInt32LE(p + 8) : 0;
        const [name, q] = cstring(b, p + (op === Op.RENAME2 ? 16 : 8));
        const [newName] = cstring(b, q);
        return this.settle(ctx, op, () => fsys.rename(ctx, n, name, newParent, newName, flags), none);
      }
      case Op.LINK: {
        const oldNode = u64(b, p);
        const [newName] = cstring(b, p + 8);
        return this.settle(ctx, op, () => fsys.link(ctx, oldNode, n, newName), entry);
      }
      case Op.OPEN: {
        const flags = b.readUInt32LE(p);
        return this.settle(ctx, op, () => fsys.open(ctx, n, flags), openOut);
      }
      case Op.CREATE: {
        const flags = b.readUInt32LE(p);
        const mode = b.readUInt32LE(p + 4);
        const [name] = cstring(b, p + 16);
        return this.settle(ctx, op, () => fsys.create(ctx, n, name, mode, flags), (r) => createOut(r.entry, r.open));
      }
      case Op.READ:
        return this.read(ctx, b, p);
      case Op.WRITE: {
        const fh = u64(b, p);
        const offset = u64(b, p + 8);
        const size = b.readUInt32LE(p + 16);
        const flags = b.readUInt32LE(p + 32);
        const data = b.subarray(p + 40, p + 40 + size);
        return this.settle(ctx, op, () => fsys.write(ctx, n, fh, offset, data, flags), writeOut);
      }
      case Op.STATFS:
        return this.settle(ctx, op, () => fsys.statfs(ctx, n), statfsOut);
      case Op.RELEASE: {
        const fh = u64(b, p);
        const flags = b.readUInt32LE(p + 8);
        return this.settle(ctx, op, () => fsys.release(ctx, n, fh, flags), none);
      }
      case Op.FLUSH:
        return this.settle(ctx, op, () => fsys.flush(ctx, n, u64(b, p)), none);
      case Op.FSYNC:
      case Op.FSYNCDIR: {
        const fh = u64(b, p);
        const datasync = (b.readUInt32LE(p + 8) & FUSE_FSYNC_FDATASYNC) !== 0;
        if (op === Op.FSYNC) return this.settle(ctx, op, () => fsys.fsync(ctx, n, fh, datasync), none);
        const fsyncdir = fsys.fsyncdir?.bind(fsys);
        return this.settle(ctx, op, () => (fsyncdir ? fsyncdir(ctx, n, fh, datasync) : undefined), none);
      }
      case Op.OPENDIR: {
        const flags = b.readUInt32LE(p);
        return this.settle(ctx, op, () => fsys.opendir(ctx, n, flags), openOut);
      }
      case Op.READDIR:
      case Op.READDIRPLUS: {
        const fh = u64(b, p);
        const offset = u64(b, p + 8);
        const size = b.readUInt32LE(p + 16);
        const plus = op === Op.READDIRPLUS;
        return this.settle(ctx, op, () => fsys.readdir(ctx, n, fh, offset, plus), (list) => {
          const packer = new DirentPacker(size, plus);
          for (const d of list) if (!packer.add(d.name, d.mode, d.ino, d.nextOffset, d.entry)) break;
          return packer.result();
        });
      }
      case Op.RELEASEDIR:
        return this.settle(ctx, op, () => fsys.releasedir(ctx, n, u64(b, p)), none);
      case Op.ACCESS:
        return this.settle(ctx, op, () => fsys.access(ctx, n, b.readUInt32LE(p)), none);
      case Op.FALLOCATE: {
        const fallocate = fsys.fallocate?.bind(fsys);
        if (!fallocate) return this.send(ctx.unique, errnos.ENOSYS);
        const fh = u64(b, p);
        const offset = u64(b, p + 8);
        const length = u64(b, p + 16);
        const mode = b.readUInt32LE(p + 24);
        return this.settle(ctx, op, () => fallocate(ctx, n, fh, offset, length, mode), none);
      }
      case Op.LSEEK: {
        const lseek = fsys.lseek?.bind(fsys);
        if (!lseek) return this.send(ctx.unique, errnos.ENOSYS);
        const fh = u64(b, p);
        const offset = u64(b, p + 8);
        const whence = b.readUInt32LE(p + 16);
        return this.settle(ctx, op, () => lseek(ctx, n, fh, offset, whence), u64Out);
      }
      case Op.INTERRUPT: {
        // The original request was read before its INTERRUPT (the kernel only
        // queues interrupts for requests already sent), so a miss means we
        // already answered it.
        const target = b.readBigUInt64LE(p);
        this.pending.get(target)?.interrupt();
        return;
      }
      case Op.DESTROY:
        this.fs.destroy?.();
        this.send(ctx.unique, 0);
        this.emit('destroy');
        return;
      case Op.SYNCFS:
        return this.send(ctx.unique, 0);
      default:
        // xattrs, locks, ioctl, poll, bmap, copy_file_range, statx, tmpfile...:
        // ENOSYS makes the kernel remember the op is unsupported and fall back
        // (EOPNOTSUPP for xattrs, local locks, generic copy, GETATTR for statx).
        return this.send(ctx.unique, errnos.ENOSYS);
    }
  }

  private read(ctx: Context, b: Buffer, p: number): void {
    const fh = u64(b, p);
    const offset = u64(b, p + 8);
    const size = b.readUInt32LE(p + 16);
    let result: Uint8Array | FdSlice | Promise<Uint8Array | FdSlice>;
    try {
      result = this.fs.read(ctx, ctx.nodeid, fh, offset, size);
    } catch (err) {
      this.fail(ctx.unique, err, Op.READ);
      return;
    }
    const finish = (r: Uint8Array | FdSlice) => {
      if (isFdSlice(r)) this.dev().replyFromFd(ctx.unique, r.fd, r.offset, r.size);
      else this.send(ctx.unique, 0, r);
    };
    if (!isPromise(result)) return finish(result);
    this.pending.set(ctx.unique, ctx);
    result.then(
      (r) => {
        if (this.pending.delete(ctx.unique)) finish(r);
      },
      (err: unknown) => {
        if (this.pending.delete(ctx.unique)) this.fail(ctx.unique, err, Op.READ);
      },
    );
  }

  private init(ctx: Context, b: Buffer, p: number): void {
    const major = b.readUInt32LE(p);
    const minor = b.readUInt32LE(p + 4);
    const maxReadahead = b.readUInt32LE(p + 8);
    let offered = BigInt(b.readUInt32LE(p + 12));
    if (major < FUSE_KERNEL_VERSION || (major === 7 && minor < 31)) {
      this.send(ctx.unique, errnos.EPROTO);
      return;
    }
    const out = Buffer.alloc(INIT_OUT_SIZE);
    if (major > FUSE_KERNEL_VERSION) {
      // Tell a newer kernel our major; it will send INIT again.
      out.writeUInt32LE(FUSE_KERNEL_VERSION, 0);
      this.send(ctx.unique, 0, out.subarray(0, 8));
      return;
    }
    if (offered & Init.INIT_EXT) offered |= BigInt(b.readUInt32LE(p + 16)) << 32n;

    let want =
      Init.ASYNC_READ |
      Init.ATOMIC_O_TRUNC |
      Init.BIG_WRITES |
      Init.AUTO_INVAL_DATA |
      Init.DO_READDIRPLUS |
      Init.READDIRPLUS_AUTO |
      Init.ASYNC_DIO |
      Init.PARALLEL_DIROPS |
      Init.MAX_PAGES |
      Init.CACHE_SYMLINKS |
      Init.INIT_EXT;
    const passthrough = !!this.opts.passthrough && (offered & Init.PASSTHROUGH) !== 0n;
    if (passthrough) want |= Init.PASSTHROUGH;
    const flags = want & offered;

    const maxPages = Math.min(256, MAX_WRITE / 4096);
    out.writeUInt32LE(FUSE_KERNEL_VERSION, 0);
    out.writeUInt32LE(Math.min(minor, FUSE_KERNEL_MINOR_VERSION), 4);
    out.writeUInt32LE(maxReadahead, 8);
    out.writeUInt32LE(Number(flags & 0xffff_ffffn), 12);
    out.writeUInt16LE(64, 16); // max_background
    out.writeUInt16LE(48, 18); // congestion_threshold
    out.writeUInt32LE(MAX_WRITE, 20);
    out.writeUInt32LE(1, 24); // time_gran: nanoseconds
    out.writeUInt16LE(maxPages, 28);
    out.writeUInt32LE(Number(flags >> 32n), 32);
    // 0 silently disables passthrough; 1 = the backing fs is not itself stacked.
    out.writeUInt32LE(passthrough ? 1 : 0, 36);
    this.send(ctx.unique, 0, out);

    this.initInfo = { major, minor, flags, passthrough, maxWrite: MAX_WRITE, maxPages };
    this.fs.init?.({ passthrough, minor });
    this.emit('init', this.initInfo);
  }
}

function decodeSetattr(b: Buffer, p: number): SetAttrIn {
  const valid = b.readUInt32LE(p);
  const s: SetAttrIn = { valid };
  if (valid & FATTR_FH) s.fh = u64(b, p + 8);
  if (valid & FATTR_SIZE) s.size = u64(b, p + 16);
  if (valid & FATTR_ATIME) {
    s.atimeNs = valid & FATTR_ATIME_NOW ? 'now' : b.readBigInt64LE(p + 32) * 1_000_000_000n + BigInt(b.readUInt32LE(p + 56));
  }
  if (valid & FATTR_MTIME) {
    s.mtimeNs = valid & FATTR_MTIME_NOW ? 'now' : b.readBigInt64LE(p + 40) * 1_000_000_000n + BigInt(b.readUInt32LE(p + 60));
  }
  if (valid & FATTR_MODE) s.mode = b.readUInt32LE(p + 68);
  if (valid & FATTR_UID) s.uid = b.readUInt32LE(p + 76);
  if (valid & FATTR_GID) s.gid = b.readUInt32LE(p + 80);
  return s;
}
