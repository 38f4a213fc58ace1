/**
 * upaths: paths relative to a managed directory, the only paths the KVS sees.
 * A canonical upath has no leading or trailing '/', no empty, '.' or '..'
 * components and no NUL; '' is the managed directory itself. Keeping one canonical
 * spelling matters because the DYAD key hashes the string, so 'a//b' and 'a/b'
 * would otherwise be two different files.
 */
import { posix } from 'node:path';
import { DyadError, errnos } from '../errors.js';

export const MAX_UPATH_BYTES = 4095; // PATH_MAX - 1
export const MAX_NAME_BYTES = 255; // NAME_MAX
/** Bounds the per-publish work and the size of change notifications. */
export const MAX_UPATH_COMPONENTS = 256;

function invalid(upath: unknown, why: string): DyadError {
  const shown = typeof upath === 'string' ? JSON.stringify(upath.length > 200 ? upath.slice(0, 200) + '…' : upath) : typeof upath;
  return new DyadError('DYAD_EINVAL', errnos.EINVAL, `invalid KVS path ${shown}: ${why}`);
}

/**
 * Throws DYAD_EINVAL unless `upath` is canonical. The root '' is accepted only
 * with allowRoot (lookups and listings may name it, publications may not).
 */
export function checkUpath(upath: unknown, allowRoot = false): asserts upath is string {
  if (typeof upath !== 'string') throw invalid(upath, 'not a string');
  if (upath === '') {
    if (allowRoot) return;
    throw invalid(upath, 'the managed directory itself cannot be published');
  }
  if (upath.includes('\0')) throw invalid(upath, 'contains NUL');
  if (Buffer.byteLength(upath, 'utf8') > MAX_UPATH_BYTES) throw invalid(upath, `longer than ${MAX_UPATH_BYTES} bytes`);
  const parts = upath.split('/');
  if (parts.length > MAX_UPATH_COMPONENTS) throw invalid(upath, `more than ${MAX_UPATH_COMPONENTS} components`);
  for (const part of parts) {
    if (part === '') throw invalid(upath, "leading, trailing or doubled '/' (use a path relative to the managed directory)");
    if (part === '.' || part === '..') throw invalid(upath, "'.' and '..' components are not allowed");
    if (part.length > MAX_NAME_BYTES / 3 && Buffer.byteLength(part, 'utf8') > MAX_NAME_BYTES) {
      throw invalid(upath, `a component is longer than ${MAX_NAME_BYTES} bytes`);
    }
  }
}

/** The directory holding upath ('' for top-level entries and for the root). */
export function parentOf(upath: string): string {
  const i = upath.lastIndexOf('/');
  return i < 0 ? '' : upath.slice(0, i);
}

export function baseName(upath: string): string {
  return upath.slice(upath.lastIndexOf('/') + 1);
}

/** '' joined with 'a' is 'a'. */
export function joinUpath(dir: string, name: string): string {
  return dir === '' ? name : `${dir}/${name}`;
}

/**
 * The upath of `path` inside `managedDir`, or undefined when it lies outside.
 * Both are normalised lexically (no symlink resolution): relative paths are taken
 * relative to managedDir, as DYAD_PATH_RELATIVE does.
 */
export function upathOf(managedDir: string, path: string): string | undefined {
  const root = posix.normalize(managedDir).replace(/\/+$/, '') || '/';
  const full = posix.normalize(path.startsWith('/') ? path : `${root}/${path}`).replace(/\/+$/, '') || '/';
  if (full === root) return '';
  const prefix = root === '/' ? '/' : `${root}/`;
  if (!full.startsWith(prefix)) return undefined;
  const rel = full.slice(prefix.length);
  return rel === '..' || rel.startsWith('../') ? undefined : rel;
}
