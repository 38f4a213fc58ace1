/**
 * What the calling thread is doing, read from /proc/<tid>/syscall while it is
 * blocked in our request. FUSE sends the same LOOKUP for `cat f`, `touch f`
 * and `stat f`; only the system call tells a reader (who may be worth making
 * wait) from a creator or a mere probe (which must never wait).
 *
 * The request header's pid is the caller's thread id, and its syscall file
 * stays readable while it sleeps in the FUSE request. openat2 keeps its flags
 * in a struct in the caller's memory, read through /proc/<tid>/mem.
 */
import fs from 'node:fs';
import { native } from './native.js';

export type CallerKind =
  /** open/openat/openat2/execve without O_CREAT: wants existing content. */
  | 'open'
  /** open with O_CREAT, creat, mkdir, mknod, symlink, link, rename target. */
  | 'create'
  /** stat, access, readlink, chdir, unlink, xattr...: asks, never waits. */
  | 'probe'
  /** /proc unreadable, or a syscall we do not know (io_uring, ...). */
  | 'unknown';

export interface Caller {
  kind: CallerKind;
  syscall: number;
  /** open flags, for the open family. */
  flags?: number;
  /** An execve: the kernel checks the execute bit before it opens. */
  exec?: boolean;
  /** Thread id, and the syscall's dirfd and path pointer where it has them (see callerPath). */
  tid?: number;
  dirfd?: number;
  pathPtr?: bigint;
}

const O_CREAT = 0o100;

/** flagsArg/pathArg: argument positions; dirfd: the path is relative to argument 0. */
type Rule = { kind: CallerKind; flagsArg?: number; how?: boolean; pathArg?: number; dirfd?: boolean; exec?: boolean };

// x86_64 numbers (arch/x86/entry/syscalls/syscall_64.tbl).
const X86_64: Record<number, Rule> = {
  2: { kind: 'open', flagsArg: 1, pathArg: 0 }, // open
  257: { kind: 'open', flagsArg: 2, pathArg: 1, dirfd: true }, // openat
  437: { kind: 'open', how: true, pathArg: 1, dirfd: true }, // openat2
  59: { kind: 'open', pathArg: 0, exec: true }, // execve
  322: { kind: 'open', exec: true }, // execveat
  85: { kind: 'create', pathArg: 0 }, // creat
  83: { kind: 'create', pathArg: 0 }, // mkdir
  258: { kind: 'create', pathArg: 1, dirfd: true }, // mkdirat
  133: { kind: 'create', pathArg: 0 }, // mknod
  259: { kind: 'create', pathArg: 1, dirfd: true }, // mknodat
  88: { kind: 'create' }, // symlink
  266: { kind: 'create' }, // symlinkat
  86: { kind: 'create' }, // link
  265: { kind: 'create' }, // linkat
  82: { kind: 'create' }, // rename
  264: { kind: 'create' }, // renameat
  316: { kind: 'create' }, // renameat2
};

// aarch64 numbers (include/uapi/asm-generic/unistd.h); no legacy calls.
const AARCH64: Record<number, Rule> = {
  56: { kind: 'open', flagsArg: 2, pathArg: 1, dirfd: true }, // openat
  437: { kind: 'open', how: true, pathArg: 1, dirfd: true }, // openat2
  221: { kind: 'open', pathArg: 0, exec: true }, // execve
  281: { kind: 'open', exec: true }, // execveat
  34: { kind: 'create', pathArg: 1, dirfd: true }, // mkdirat
  33: { kind: 'create', pathArg: 1, dirfd: true }, // mknodat
  36: { kind: 'create' }, // symlinkat
  37: { kind: 'create' }, // linkat
  38: { kind: 'create' }, // renameat
  276: { kind: 'create' }, // renameat2
};

const TABLE = process.arch === 'arm64' ? AARCH64 : process.arch === 'x64' ? X86_64 : undefined;

function readHow(tid: number, addr: bigint): number | undefined {
  const buf = Buffer.alloc(8);
  if (readMem(tid, addr, buf) !== 8) return undefined;
  return Number(buf.readBigUInt64LE(0) & 0xffff_ffffn);
}

// One LOOKUP of a missing name reads this file. Its descriptor is kept per
// thread (a program creating many files is one thread asking again and
// again), and a pread at offset 0 makes procfs describe the thread anew:
// one system call instead of open, read, close. A descriptor outlives its
// thread harmlessly: reads then fail with ESRCH, and a new thread that got
// the same id is opened afresh. The line is at most a syscall number and
// six arguments, with the stack and program counters.
const MAX_CACHED_FDS = 32;

function forgetFd(cache: Map<number, number>, tid: number): void {
  const fd = cache.get(tid);
  if (fd === undefined) return;
  cache.delete(tid);
  fs.closeSync(fd);
}

/** Opens /proc/<tid>/<file> into `cache`, dropping the oldest entry when full. */
function openCached(cache: Map<number, number>, tid: number, file: string): number {
  // Drop the oldest: the threads asking now are the ones worth keeping.
  if (cache.size >= MAX_CACHED_FDS) forgetFd(cache, cache.keys().next().value as number);
  const fd = fs.openSync(`/proc/${tid}/${file}`, 'r');
  cache.set(tid, fd);
  return fd;
}

/**
 * Reads /proc/<tid>/<file> at `pos` through the thread's cached descriptor.
 * One that has gone stale (its thread is gone, or exec'd: the read fails or
 * returns nothing) is opened afresh once. Undefined when that fails too.
 */
function readProc(cache: Map<number, number>, tid: number, file: string, buf: Buffer, pos: number | bigint): number | undefined {
  const cached = cache.get(tid);
  for (const fd0 of cached === undefined ? [undefined] : [cached, undefined]) {
    try {
      const fd = fd0 ?? openCached(cache, tid, file);
      const n = fs.readSync(fd, buf, 0, buf.length, pos);
      if (n > 0) return n;
    } catch {
      /* stale descriptor, or no such thread */
    }
    forgetFd(cache, tid);
  }
  return undefined;
}

// The caller's memory, for the path of an open (callerPath) and openat2's
// flags: kept per thread like the syscall file. A descriptor stays bound to
// the address space it was opened on.
const memFds = new Map<number, number>();

function readMem(tid: number, addr: bigint, buf: Buffer): number | undefined {
  return readProc(memFds, tid, 'mem', buf, addr);
}

/** A reader of /proc/<tid>/<file> as text (at most `size` bytes), its descriptors kept per thread as above. */
function procText(file: string, size: number): (tid: number) => string | undefined {
  const fds = new Map<number, number>();
  const buf = Buffer.alloc(size);
  return (tid) => {
    const n = readProc(fds, tid, file, buf, 0);
    return n === undefined ? undefined : buf.toString('latin1', 0, n);
  };
}

const readSyscall = procText('syscall', 512);

/** Classifies the system call thread `tid` is blocked in. */
export function callerOf(tid: number): Caller {
  if (!tid || !TABLE) return { kind: 'unknown', syscall: -1 };
  const text = readSyscall(tid);
  if (text === undefined) return { kind: 'unknown', syscall: -1 };
  const fields = text.trim().split(' ');
  const nr = Number(fields[0]);
  if (!Number.isInteger(nr)) return { kind: 'unknown', syscall: -1 }; // "running" or "-1 ..."
  const rule = TABLE[nr];
  if (!rule) return { kind: 'probe', syscall: nr };
  let flags: number | undefined;
  if (rule.flagsArg !== undefined) {
    flags = Number(BigInt(fields[1 + rule.flagsArg] ?? '0') & 0xffff_ffffn);
  } else if (rule.how) {
    flags = readHow(tid, BigInt(fields[3] ?? '0'));
    if (flags === undefined) return { kind: 'unknown', syscall: nr };
  }
  const kind = rule.kind === 'open' && flags !== undefined && flags & O_CREAT ? 'create' : rule.kind;
  const c: Caller = { kind, syscall: nr, tid };
  if (flags !== undefined) c.flags = flags;
  if (rule.exec) c.exec = true;
  if (rule.pathArg !== undefined) {
    c.pathPtr = BigInt(fields[1 + rule.pathArg] ?? '0');
    if (rule.dirfd) c.dirfd = Number(BigInt.asIntN(32, BigInt(fields[1] ?? '0')));
  }
  return c;
}

const AT_FDCWD = -100;

const pathBuf = Buffer.alloc(4096);

/** The path string the caller passed to its open, as written (maybe relative), or undefined. */
export function callerRawPath(c: Caller): string | undefined {
  if (c.tid === undefined || c.pathPtr === undefined || c.pathPtr === 0n) return undefined;
  const n = readMem(c.tid, c.pathPtr, pathBuf);
  if (n === undefined) return undefined;
  const end = pathBuf.indexOf(0);
  if (end < 0 || end >= n) return undefined;
  return pathBuf.toString('utf8', 0, end);
}

/**
 * The absolute path the caller passed to its open, as far as /proc can tell
 * (its cwd or dirfd joined with the string in its memory), or undefined.
 * Read only when needed: a read of the caller's memory, and of its cwd or
 * dirfd link for a relative path.
 */
export function callerPath(c: Caller, raw: string | undefined = callerRawPath(c)): string | undefined {
  if (raw === undefined || raw.startsWith('/')) return raw;
  try {
    const base =
      c.dirfd === undefined || c.dirfd === AT_FDCWD
        ? fs.readlinkSync(`/proc/${c.tid}/cwd`)
        : fs.readlinkSync(`/proc/${c.tid}/fd/${c.dirfd}`);
    return `${base}/${raw}`;
  } catch {
    return undefined;
  }
}

/**
 * Does process `pid`, or one of its descendants (which may have inherited
 * it), still hold a descriptor on `file` (the path as the kernel shows it,
 * through the mount)? Asked at FLUSH: close() already removed the closing
 * descriptor, so any match is another one (a dup, a second open, a child's
 * copy). Undefined when /proc cannot tell.
 */
export function holdsDescriptorOn(pid: number, file: string): boolean | undefined {
  const n = native.fdsLinkingTo(pid, file, true);
  return n < 0 ? undefined : n > 0;
}

const readStatus = procText('status', 4096);
const NO_GROUPS = new Uint32Array(0);

/**
 * The supplementary groups of thread `tid` (the "Groups:" line of its
 * status), which the FUSE request header does not carry. None when /proc
 * cannot tell: the caller then counts as a member of its own group only,
 * which can refuse but never grant more than it has.
 */
export function callerGroups(tid: number): Uint32Array {
  const text = tid ? readStatus(tid) : undefined;
  if (text === undefined) return NO_GROUPS;
  const at = text.indexOf('\nGroups:');
  if (at < 0) return NO_GROUPS;
  const end = text.indexOf('\n', at + 1);
  const ids = text
    .slice(at + 8, end < 0 ? undefined : end)
    .trim()
    .split(/\s+/)
    .filter((f) => f !== '')
    .map(Number);
  return ids.every((g) => Number.isInteger(g) && g >= 0) ? Uint32Array.from(ids) : NO_GROUPS;
}

/** Are two thread ids threads of one process? */
export function sameProcess(tid: number, other: number): boolean {
  return tid === other || fs.existsSync(`/proc/${tid}/task/${other}`);
}

const readStatm = procText('statm', 128);

/**
 * What the thread closing a file is doing, from /proc/<tid>/statm (the only
 * question asked at every FLUSH before any other):
 * - 'exiting': its memory is gone (do_exit releases it before it closes the
 *   process's files);
 * - 'exec': it is in execve, closing its close-on-exec descriptors: its new
 *   memory holds no program yet (no text);
 * - 'running': anything else.
 * Undefined when /proc cannot tell.
 *
 * Why ask: during execve the kernel holds the process's exec lock, and
 * reading its stat, syscall or memory, or its descriptors' links, waits
 * for that lock, which is held until our reply to that very FLUSH. statm
 * takes no such lock.
 */
export function closerState(tid: number): 'exiting' | 'exec' | 'running' | undefined {
  // size resident shared text lib data dt, in pages
  const fields = readStatm(tid)?.trim().split(' ');
  if (!fields) return undefined;
  const size = Number(fields[0]);
  const text = Number(fields[3]);
  if (!Number.isInteger(size) || !Number.isInteger(text)) return undefined;
  if (size === 0) return 'exiting';
  return text === 0 ? 'exec' : 'running';
}

const readStat = procText('stat', 1024);
const PF_EXITING = 0x4;

/**
 * Is thread `tid` exiting because a signal killed its process? Asked at the
 * FLUSH of a descriptor the kernel closes for a dying process: its stat shows
 * PF_EXITING, and the wait status it will report is set before its
 * descriptors are closed; a signal's number there means killed, not exit().
 * The last thread of a group to go closes the files; in a normal exit it
 * carries the group's exit status too. Undefined when /proc cannot tell.
 */
export function killedBySignal(tid: number): boolean | undefined {
  const text = readStat(tid)?.trimEnd();
  if (text === undefined) return undefined;
  // exit_code is the last field (52): 0 for a thread that is not exiting,
  // which spares parsing the rest on every close().
  const exitCode = Number(text.slice(text.lastIndexOf(' ') + 1));
  if (!Number.isInteger(exitCode)) return undefined;
  if ((exitCode & 0x7f) === 0) return false;
  // flags is field 9, counted after the command name (field 2), which may
  // hold spaces and parentheses.
  const flags = Number(text.slice(text.lastIndexOf(')') + 2).split(' ', 7)[9 - 3]);
  if (!Number.isInteger(flags)) return undefined;
  return (flags & PF_EXITING) !== 0;
}
