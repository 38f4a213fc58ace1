/**
 * Where the etcd backend keeps things. Everything of namespace NS lives under
 * one prefix, so one range delete removes a namespace and one prefix watch sees
 * every change to it:
 *
 *   <root>/nsidx/NS                  ''            namespace index (listNamespaces without scanning data)
 *   <root>/ns/NS/meta                NsMeta JSON   existence marker, secret, key parameters
 *   <root>/ns/NS/root                dir record    the namespace root ('')
 *   <root>/ns/NS/k/<DYAD key>        file record   genPathKey(upath, depth, bins), as DYAD stores it
 *   <root>/ns/NS/e/<dir>\0<name>     record        directory entry; a directory's own record lives
 *                                                  in its entry in its parent, so list() is one range
 *   <root>/ns/NS/r/<rank, 10 digits> RankInfo JSON under the registering client's lease
 *
 * Record values are JSON without the version: a record's version is the etcd
 * mod_revision of its key, so it is assigned by etcd in the same step that
 * stores it and grows across unpublish and republish.
 */
import type { IKeyValue } from 'etcd3';
import { kvsError } from '../errors.js';
import type { FileRecord, RankInfo } from '../types.js';
import { checkRankInfo } from '../validate.js';
import { DIR_MODE } from '../embedded/store.js';

export interface KeyRange {
  key: Buffer;
  end: Buffer;
}

/** What a key inside a namespace prefix is. */
export type KeyClass =
  | { kind: 'meta' }
  | { kind: 'root' }
  | { kind: 'file' }
  | { kind: 'entry'; upath: string }
  | { kind: 'rank'; rank: number }
  | { kind: 'other' };

export interface NsMeta {
  /** Distinguishes this incarnation of the namespace from a later one of the same name. */
  id: string;
  secret: string;
  createdMs: number;
  keyDepth: number;
  keyBins: number;
}

/** The first key after every key starting with `prefix`. */
export function prefixEnd(prefix: Buffer): Buffer {
  const end = Buffer.from(prefix);
  for (let i = end.length - 1; i >= 0; i--) {
    if (end[i]! < 0xff) {
      end[i]!++;
      return end.subarray(0, i + 1);
    }
  }
  // Only 0xff bytes: everything after; etcd spells that "\0".
  return Buffer.from([0]);
}

const RANK_DIGITS = 10;

export class EtcdLayout {
  constructor(readonly root: string) {}

  nsPrefix(ns: string): string {
    return `${this.root}/ns/${ns}/`;
  }

  nsRange(ns: string): KeyRange {
    const key = Buffer.from(this.nsPrefix(ns));
    return { key, end: prefixEnd(key) };
  }

  nsIndex(ns: string): Buffer {
    return Buffer.from(`${this.root}/nsidx/${ns}`);
  }

  nsIndexRange(): KeyRange {
    const key = Buffer.from(`${this.root}/nsidx/`);
    return { key, end: prefixEnd(key) };
  }

  nsFromIndex(key: Buffer): string {
    return key.toString('utf8').slice(`${this.root}/nsidx/`.length);
  }

  meta(ns: string): Buffer {
    return Buffer.from(`${this.nsPrefix(ns)}meta`);
  }

  rootDir(ns: string): Buffer {
    return Buffer.from(`${this.nsPrefix(ns)}root`);
  }

  file(ns: string, dyadKey: string): Buffer {
    return Buffer.from(`${this.nsPrefix(ns)}k/${dyadKey}`);
  }

  /** The entry of upath (not '') in its parent directory. */
  entry(ns: string, upath: string): Buffer {
    const slash = upath.lastIndexOf('/');
    const dir = slash < 0 ? '' : upath.slice(0, slash);
    return Buffer.from(`${this.nsPrefix(ns)}e/${dir}\0${upath.slice(slash + 1)}`);
  }

  /** Where the record of directory `upath` lives: the root key, or its entry. */
  dirRecord(ns: string, upath: string): Buffer {
    return upath === '' ? this.rootDir(ns) : this.entry(ns, upath);
  }

  entries(ns: string, dir: string): KeyRange {
    const key = Buffer.from(`${this.nsPrefix(ns)}e/${dir}\0`);
    return { key, end: prefixEnd(key) };
  }

  /** Entry name of a key from entries(ns, dir). */
  entryName(ns: string, dir: string, key: Buffer): string {
    return key.toString('utf8').slice(`${this.nsPrefix(ns)}e/${dir}\0`.length);
  }

  rank(ns: string, rank: number): Buffer {
    return Buffer.from(`${this.nsPrefix(ns)}r/${String(rank).padStart(RANK_DIGITS, '0')}`);
  }

  ranks(ns: string): KeyRange {
    const key = Buffer.from(`${this.nsPrefix(ns)}r/`);
    return { key, end: prefixEnd(key) };
  }

  classify(ns: string, key: Buffer): KeyClass {
    const s = key.toString('utf8');
    const p = this.nsPrefix(ns);
    if (!s.startsWith(p)) return { kind: 'other' };
    const rest = s.slice(p.length);
    if (rest === 'meta') return { kind: 'meta' };
    if (rest === 'root') return { kind: 'root' };
    if (rest.startsWith('k/')) return { kind: 'file' };
    if (rest.startsWith('e/')) {
      const nul = rest.indexOf('\0');
      if (nul < 0) return { kind: 'other' };
      const dir = rest.slice(2, nul);
      const name = rest.slice(nul + 1);
      return { kind: 'entry', upath: dir === '' ? name : `${dir}/${name}` };
    }
    if (rest.startsWith('r/')) {
      const rank = Number(rest.slice(2));
      return Number.isInteger(rank) ? { kind: 'rank', rank } : { kind: 'other' };
    }
    return { kind: 'other' };
  }
}

function corrupt(kv: IKeyValue, why: string): Error {
  return kvsError('DYAD_EIO', 'EIO', `etcd key ${JSON.stringify(kv.key.toString('utf8'))} holds an unusable value: ${why}`);
}

function parseJson(kv: IKeyValue): Record<string, unknown> {
  let v: unknown;
  try {
    v = JSON.parse(kv.value.toString('utf8'));
  } catch {
    throw corrupt(kv, 'not JSON');
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw corrupt(kv, 'not a JSON object');
  return v as Record<string, unknown>;
}

export function encodeFile(rec: Omit<FileRecord, 'version' | 'kind'>): Buffer {
  const { owner, size, mode, mtimeMs, digest } = rec;
  return Buffer.from(JSON.stringify({ kind: 'file', owner, size, mode, mtimeMs, digest }));
}

export function encodeDir(mtimeMs: number): Buffer {
  return Buffer.from(JSON.stringify({ kind: 'dir', owner: -1, size: 0, mode: DIR_MODE, mtimeMs, digest: '' }));
}

export function dirRecord(version: number, mtimeMs: number): FileRecord {
  return { owner: -1, size: 0, mode: DIR_MODE, mtimeMs, digest: '', version, kind: 'dir' };
}

/** The record stored at kv, versioned by its mod_revision. */
export function decodeRecord(kv: IKeyValue): FileRecord {
  const o = parseJson(kv);
  const { kind, owner, size, mode, mtimeMs, digest } = o;
  if (
    (kind !== 'file' && kind !== 'dir') ||
    typeof owner !== 'number' ||
    typeof size !== 'number' ||
    typeof mode !== 'number' ||
    typeof mtimeMs !== 'number' ||
    typeof digest !== 'string'
  ) {
    throw corrupt(kv, 'not a file record');
  }
  const version = Number(kv.mod_revision);
  if (kind === 'dir') return dirRecord(version, mtimeMs);
  return { owner, size, mode, mtimeMs, digest, version, kind };
}

export function encodeMeta(meta: NsMeta): Buffer {
  return Buffer.from(JSON.stringify({ v: 1, ...meta }));
}

export function decodeMeta(kv: IKeyValue): NsMeta {
  const o = parseJson(kv);
  const { id, secret, createdMs, keyDepth, keyBins } = o;
  if (
    typeof id !== 'string' ||
    typeof secret !== 'string' ||
    typeof createdMs !== 'number' ||
    typeof keyDepth !== 'number' ||
    typeof keyBins !== 'number'
  ) {
    throw corrupt(kv, 'not a namespace marker');
  }
  return { id, secret, createdMs, keyDepth, keyBins };
}

export function encodeRank(info: RankInfo): Buffer {
  return Buffer.from(JSON.stringify(info));
}

export function decodeRank(kv: IKeyValue): RankInfo {
  try {
    return checkRankInfo(parseJson(kv));
  } catch (err) {
    throw corrupt(kv, err instanceof Error ? err.message : String(err));
  }
}
