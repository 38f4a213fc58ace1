/**
 * Typed access to the native addon (native/src). The addon does only what
 * JavaScript cannot: mount(2), non-blocking reads of /dev/fuse on the libuv
 * loop, single-writev replies, and the passthrough ioctls.
 */
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

export interface FuseDeviceHandle {
  /** Starts watching the fd on the event loop; 0 or a negative errno. */
  start(): number;
  stop(): void;
  /** Writes one message (header + payload) with a single writev. */
  reply(buffers: Uint8Array[]): number;
  /** Answers a READ with pread(fd) straight into the reply; bytes or -errno. */
  replyFromFd(unique: bigint, fd: number, offset: number, size: number): number;
  backingOpen(fd: number): number;
  backingClose(id: number): number;
  setSpin(microseconds: number): void;
  ref(): void;
  unref(): void;
}

export interface FuseDeviceConstructor {
  new (
    fd: number,
    bufferSize: number,
    onRequest: (buf: Buffer) => void,
    onError: (errno: number) => void,
  ): FuseDeviceHandle;
}

export interface NativeAddon {
  FuseDevice: FuseDeviceConstructor;
  openDevice(path?: string): number;
  mount(source: string, target: string, fstype: string, flags: number, data: string): number;
  umount(target: string, flags: number): number;
  closeFd(fd: number): number;
  fusermountMount(helper: string, mountpoint: string, options: string): number;
  fallocate(fd: number, mode: number, offset: number, length: number): number;
  lseek(fd: number, offset: number, whence: number): number;
  /** A directory's entries but . and .., with their types (S_IFMT >> 12) and inode numbers, or -errno. */
  readDir(path: string): { names: string[]; types: Uint8Array; inos: Float64Array } | number;
  /** nsec -1 = UTIME_NOW, -2 = UTIME_OMIT. */
  utimens(path: string, atimeSec: number, atimeNsec: number, mtimeSec: number, mtimeNsec: number, nofollow: boolean): number;
  /** How many descriptors of process pid (and its descendants) link to exactly `target` (by /proc readlink), or -errno. */
  fdsLinkingTo(pid: number, target: string, withDescendants: boolean): number;
  fsetxattr(fd: number, name: string, value: Buffer): number;
  /** fremovexattr for a descriptor, lremovexattr for a path. */
  removexattr(target: number | string, name: string): number;
  /** A short attribute's value (at most 255 bytes), or -errno (-ENODATA: not set). */
  lgetxattr(path: string, name: string): string | number;
  lsetxattr(path: string, name: string, value: Buffer): number;
  /** This thread's fsuid, fsgid and supplementary groups become the caller's; 0 or -errno. */
  actAs(uid: number, gid: number, groups: Uint32Array): number;
  /** Back to the daemon's own identity; 0 or -errno. */
  actAsSelf(): number;
  /** faccessat2(path, mask, AT_EACCESS | AT_SYMLINK_NOFOLLOW) with this thread's identity; 0 or -errno. */
  accessAs(path: string, mask: number): number;
  /** Whether actAs and accessAs work here (root with CAP_SETUID and CAP_SETGID, Linux 5.8+); 0 or -errno. */
  canActAs(): number;
}

const here = path.dirname(fileURLToPath(import.meta.url));
// dist/src/fuse -> repository root
const root = path.resolve(here, '..', '..', '..');
const require = createRequire(import.meta.url);

export const native: NativeAddon = require(
  path.join(root, 'native', 'build', 'Release', 'dyadfuse.node'),
) as NativeAddon;

export const MS_NOSUID = 2;
export const MS_NODEV = 4;
export const MNT_DETACH = 2;
