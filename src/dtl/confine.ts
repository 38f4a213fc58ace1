/**
 * Opens a peer-supplied relative path beneath the served root without ever
 * leaving it. The root may be a "/proc/self/fd/N" path (a directory fd
 * opened before a FUSE mount shadowed the directory); resolving it with
 * realpath would land on the shadowing mount, so the root is never resolved,
 * only joined with already-validated relative components.
 *
 * Method:
 *  1. Lexical check: relative, no NUL, no empty, "." or ".." components,
 *     bounded lengths. After this no component can climb out.
 *  2. Walk: every directory component is opened with
 *     O_DIRECTORY|O_NOFOLLOW, and the next component is opened relative to
 *     that fd through "/proc/self/fd/<dirfd>/<name>" (openat(2) emulation;
 *     Node has no openat). The final component is opened with O_NOFOLLOW.
 *     A symlink anywhere therefore fails the open itself rather than being
 *     checked beforehand, so swapping a directory for a symlink between a
 *     check and the open (TOCTOU) gains nothing.
 *  3. Only when an open fails with ELOOP/ENOTDIR is the component lstat'ed,
 *     to report "symlink refused" rather than "not found".
 * O_NONBLOCK keeps a FIFO planted in the root from blocking the open; the
 * caller refuses anything fstat does not call a regular file.
 * Hard links into the root are out of scope (they need access to the target
 * when created, and protected_hardlinks restricts them further).
 *
 * The calls are synchronous on purpose: each is one metadata syscall on
 * node-local storage, far cheaper than a thread-pool hop per component.
 */
import { closeSync, constants, lstatSync, openSync } from 'node:fs';
import { DyadError, errnos } from '../errors.js';

export const MAX_UPATH_BYTES = 4096;
const MAX_NAME_BYTES = 255;

const FILE_FLAGS = constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK;
const DIR_FLAGS = constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_DIRECTORY;

export function refused(upath: string, why: string): DyadError {
  return new DyadError('DYAD_EFORBIDDEN', errnos.EACCES, `path ${JSON.stringify(upath)} refused: ${why}`);
}

/** Splits and validates a peer-supplied upath; throws DYAD_EFORBIDDEN. */
export function splitUpath(upath: string): string[] {
  if (upath.length === 0) throw refused(upath, 'empty');
  if (upath.includes('\0')) throw refused(upath, 'contains NUL');
  if (upath.startsWith('/')) throw refused(upath, 'absolute');
  if (Buffer.byteLength(upath) > MAX_UPATH_BYTES) throw refused(upath, 'too long');
  const parts = upath.split('/');
  for (const p of parts) {
    if (p === '' || p === '.') throw refused(upath, 'empty or "." component');
    if (p === '..') throw refused(upath, '".." component');
    if (Buffer.byteLength(p) > MAX_NAME_BYTES) throw refused(upath, 'component too long');
  }
  return parts;
}

function isSymlink(path: string): boolean {
  try {
    return lstatSync(path).isSymbolicLink();
  } catch {
    return false;
  }
}

function openStep(path: string, flags: number, upath: string): number {
  try {
    return openSync(path, flags);
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    if ((code === 'ELOOP' || code === 'ENOTDIR') && isSymlink(path)) {
      throw refused(upath, 'symlink component');
    }
    throw err;
  }
}

/**
 * Opens `upath` read-only beneath `root` and returns the fd. Throws
 * DYAD_EFORBIDDEN for invalid paths and symlinks; other failures are the
 * system errors of open(2) (ENOENT, ENOTDIR, EACCES...).
 */
export function openBeneath(root: string, upath: string): number {
  const parts = splitUpath(upath);
  const base = root.endsWith('/') ? root : root + '/';
  if (parts.length === 1) return openStep(base + parts[0], FILE_FLAGS, upath);
  let dirfd = openStep(base + parts[0], DIR_FLAGS, upath);
  try {
    for (let i = 1; i < parts.length; i++) {
      const last = i === parts.length - 1;
      const next = openStep(`/proc/self/fd/${dirfd}/${parts[i]}`, last ? FILE_FLAGS : DIR_FLAGS, upath);
      closeSync(dirfd);
      dirfd = next;
    }
    const fd = dirfd;
    dirfd = -1;
    return fd;
  } finally {
    if (dirfd >= 0) closeSync(dirfd);
  }
}
