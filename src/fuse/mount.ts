/**
 * Mounting: open /dev/fuse and attach it to a directory.
 *
 * Root calls mount(2) itself. Anyone else goes through the setuid
 * fusermount3 helper when it is installed. A mount whose daemon died
 * (stat gives ENOTCONN) is detached before mounting again, so a crashed
 * node comes back with one command.
 */
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { MNT_DETACH, MS_NODEV, MS_NOSUID, native } from './native.js';
import { DyadError, errnoName, errnos } from '../errors.js';

export interface MountOptions {
  fsname?: string;
  subtype?: string;
  /** Let users other than the mounter in (root mounts: on by default). */
  allowOther?: boolean;
  /** Let the kernel check permissions from the attributes we report (default); false: the file system does. */
  defaultPermissions?: boolean;
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

/** How our mounts show in /proc/self/mountinfo: source `dyad-fs`, type `fuse.dyad`. */
export const FSNAME = 'dyad-fs';
export const SUBTYPE = 'dyad';

export interface MountEntry {
  mountpoint: string;
  fstype: string;
  source: string;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo. */
const unescapeMountinfo = (s: string) => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));

/**
 * The mount on top at `dir` (the one umount(2) would remove), from
 * /proc/self/mountinfo, or undefined if nothing is mounted there. `dir`
 * must be canonical (see canonicalMountpoint).
 */
export function mountAt(dir: string): MountEntry | undefined {
  let text: string;
  try {
    text = fs.readFileSync('/proc/self/mountinfo', 'utf8');
  } catch {
    return undefined;
  }
  const here: Array<MountEntry & { id: string; parent: string }> = [];
  for (const line of text.split('\n')) {
    const f = line.split(' ');
    const sep = f.indexOf('-', 6);
    if (sep < 0 || unescapeMountinfo(f[4]!) !== dir) continue;
    here.push({ id: f[0]!, parent: f[1]!, mountpoint: dir, fstype: f[sep + 1]!, source: unescapeMountinfo(f[sep + 2]!) });
  }
  // Mounts stacked on one directory: each one's parent is the one below it.
  return here.find((m) => !here.some((o) => o.parent === m.id));
}

export function isDyadMount(m: MountEntry | undefined): boolean {
  return m !== undefined && m.fstype === `fuse.${SUBTYPE}` && m.source === FSNAME;
}

/**
 * The path mountinfo shows for `dir`: symlinks resolved. A dead mount
 * cannot be resolved itself (ENOTCONN), its parent directory can.
 */
export function canonicalMountpoint(dir: string): string {
  const abs = path.resolve(dir);
  try {
    return fs.realpathSync(abs);
  } catch {
    try {
      return path.join(fs.realpathSync(path.dirname(abs)), path.basename(abs));
    } catch {
      return abs;
    }
  }
}

/**
 * `dyad umount`: only a dyad-fs mount (what it says it unmounts); another
 * file system at the path is left alone, for umount(8).
 */
export function unmountDyad(mountpoint: string, opts: { lazy?: boolean } = {}): void {
  const mp = canonicalMountpoint(mountpoint);
  const top = mountAt(mp);
  if (top === undefined) throw new DyadError('DYAD_ENOTMOUNTED', errnos.EINVAL, `umount ${mountpoint}: not mounted`);
  if (!isDyadMount(top)) {
    throw new DyadError('DYAD_ENOTDYAD', errnos.EINVAL, `umount ${mountpoint}: not a dyad-fs mount (${top.fstype} from ${top.source}); use umount(8) for it`);
  }
  unmount(mp, opts);
}

export function mount(mountpoint: string, opts: MountOptions = {}): Mounted {
  const fsname = opts.fsname ?? FSNAME;
  const subtype = opts.subtype ?? SUBTYPE;
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
      ...(opts.defaultPermissions === false ? [] : ['default_permissions']),
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
  const options = [
    `fsname=${fsname}`,
    `subtype=${subtype}`,
    ...(opts.defaultPermissions === false ? [] : ['default_permissions']),
    ...(opts.allowOther ? ['allow_other'] : []),
  ].join(',');
  const fd = native.fusermountMount(helper, mountpoint, options);
  if (fd < 0) throw new DyadError('DYAD_EMOUNT', -fd, `fusermount3 could not mount ${mountpoint}: ${errnoName(-fd)}`);
  return { fd, mountpoint, method: 'fusermount3' };
}

const busy = (mountpoint: string) =>
  new DyadError('DYAD_EBUSY', errnos.EBUSY, `umount ${mountpoint}: busy (a file open or a working directory in it); a lazy unmount (-l) detaches it now`);

/** Unmounts; a busy mount fails with DYAD_EBUSY unless `lazy`, which detaches it now and lets the kernel finish once it is let go. */
export function unmount(mountpoint: string, opts: { lazy?: boolean } = {}): void {
  if (isRoot()) {
    const rc = native.umount(mountpoint, opts.lazy ? MNT_DETACH : 0);
    if (rc === -errnos.EINVAL) throw new DyadError('DYAD_ENOTMOUNTED', errnos.EINVAL, `umount ${mountpoint}: not mounted`);
    if (rc === -errnos.EBUSY) throw busy(mountpoint);
    if (rc < 0) throw new DyadError('DYAD_EUMOUNT', -rc, `umount ${mountpoint}: ${errnoName(-rc)}`);
    return;
  }
  const helper = findOnPath('fusermount3') ?? findOnPath('fusermount');
  if (!helper) throw new DyadError('DYAD_EPERM', errnos.EPERM, 'unmounting as a non-root user needs fusermount3');
  try {
    execFileSync(helper, ['-u', ...(opts.lazy ? ['-z'] : []), mountpoint], { stdio: 'pipe' });
  } catch (err) {
    const stderr = String((err as { stderr?: Buffer }).stderr ?? '').trim();
    // fusermount3 exits 1 whatever went wrong: its message says what.
    if (/busy/i.test(stderr)) throw busy(mountpoint);
    if (/not found|not mounted|invalid argument/i.test(stderr)) throw new DyadError('DYAD_ENOTMOUNTED', errnos.EINVAL, `umount ${mountpoint}: not mounted`);
    throw new DyadError('DYAD_EUMOUNT', /not permitted|permission denied/i.test(stderr) ? errnos.EPERM : errnos.EIO, `fusermount3 -u ${mountpoint}: ${stderr || 'failed'}`);
  }
}
