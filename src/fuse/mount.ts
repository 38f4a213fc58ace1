/**
 * Mounting: open /dev/fuse and attach it to a directory.
 *
 * Root calls mount(2) itself. Anyone else goes through the setuid
 * fusermount3 helper when it is installed. A mount whose daemon died
 * (stat gives ENOTCONN) is detached before mounting again, so a crashed
 * node comes back with one command.
 */
import fs from 'node:fs';
import { execFileSync } from 'node:child_process';
import { MNT_DETACH, MS_NODEV, MS_NOSUID, native } from './native.js';
import { DyadError, errnoName, errnos } from '../errors.js';

export interface MountOptions {
  fsname?: string;
  subtype?: string;
  /** Let users other than the mounter in (root mounts: on by default). */
  allowOther?: boolean;
  devicePath?: string;
}

export interface Mounted {
  fd: number;
  mountpoint: string;
  /** How the mount was made, which decides how to undo it. */
  method: 'mount(2)' | 'fusermount3';
}

const isRoot = () => process.getuid?.() === 0;

function findOnPath(name: string): string | undefined {
  for (const dir of (process.env.PATH ?? '/usr/bin:/bin').split(':')) {
    const p = `${dir}/${name}`;
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      /* keep looking */
    }
  }
  return undefined;
}

/** True when the path is a FUSE mount whose daemon is gone. */
export function isStaleMount(mountpoint: string): boolean {
  try {
    fs.statSync(mountpoint);
    return false;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ENOTCONN';
  }
}

/** Detaches a dead mount left by a killed daemon. */
export function clearStaleMount(mountpoint: string): boolean {
  if (!isStaleMount(mountpoint)) return false;
  unmount(mountpoint, { lazy: true });
  return true;
}

export function mount(mountpoint: string, opts: MountOptions = {}): Mounted {
  const fsname = opts.fsname ?? 'dyad-fs';
  const subtype = opts.subtype ?? 'dyad';
  if (isRoot()) {
    const fd = native.openDevice(opts.devicePath ?? '/dev/fuse');
    if (fd < 0) {
      throw new DyadError('DYAD_ENODEV', -fd, `cannot open ${opts.devicePath ?? '/dev/fuse'}: ${errnoName(-fd)}`);
    }
    const st = fs.statSync(mountpoint);
    const data = [
      `fd=${fd}`,
      `rootmode=${(st.mode & 0o170000).toString(8)}`,
      'user_id=0',
      'group_id=0',
      'default_permissions',
      ...(opts.allowOther === false ? [] : ['allow_other']),
    ].join(',');
    const rc = native.mount(fsname, mountpoint, `fuse.${subtype}`, MS_NOSUID | MS_NODEV, data);
    if (rc < 0) {
      native.closeFd(fd);
      throw new DyadError('DYAD_EMOUNT', -rc, `mount ${mountpoint}: ${errnoName(-rc)}`);
    }
    return { fd, mountpoint, method: 'mount(2)' };
  }
  const helper = findOnPath('fusermount3');
  if (!helper) {
    throw new DyadError(
      'DYAD_EPERM',
      errnos.EPERM,
      `mounting as a non-root user needs fusermount3 (apt-get install fuse3), or run as root`,
    );
  }
  const options = [`fsname=${fsname}`, `subtype=${subtype}`, 'default_permissions', ...(opts.allowOther ? ['allow_other'] : [])].join(',');
  const fd = native.fusermountMount(helper, mountpoint, options);
  if (fd < 0) throw new DyadError('DYAD_EMOUNT', -fd, `fusermount3 could not mount ${mountpoint}: ${errnoName(-fd)}`);
  return { fd, mountpoint, method: 'fusermount3' };
}

export function unmount(mountpoint: string, opts: { lazy?: boolean } = {}): void {
  if (isRoot()) {
    let rc = native.umount(mountpoint, opts.lazy ? MNT_DETACH : 0);
    if (rc === -errnos.EBUSY && !opts.lazy) rc = native.umount(mountpoint, MNT_DETACH);
    if (rc === -errnos.EINVAL) throw new DyadError('DYAD_ENOTMOUNTED', errnos.EINVAL, `umount ${mountpoint}: not mounted`);
    if (rc < 0) throw new DyadError('DYAD_EUMOUNT', -rc, `umount ${mountpoint}: ${errnoName(-rc)}`);
    return;
  }
  const helper = findOnPath('fusermount3') ?? findOnPath('fusermount');
  if (!helper) throw new DyadError('DYAD_EPERM', errnos.EPERM, 'unmounting as a non-root user needs fusermount3');
  try {
    execFileSync(helper, ['-u', ...(opts.lazy ? ['-z'] : []), mountpoint], { stdio: 'pipe' });
  } catch (err) {
    const stderr = String((err as { stderr?: Buffer }).stderr ?? '').trim();
    throw new DyadError('DYAD_EUMOUNT', errnos.EBUSY, `fusermount3 -u ${mountpoint}: ${stderr || 'failed'}`);
  }
}
