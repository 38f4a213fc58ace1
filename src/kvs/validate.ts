/**
 * Validation of everything a KVS caller supplies besides upaths: namespace names,
 * published records and rank entries. Backends run these on untrusted input (the
 * embedded server gets it off the network), so they check types at run time and
 * return fresh objects holding only the known fields.
 */
import { invalidArgument } from './errors.js';
import type { PublishInput, RankInfo } from './types.js';

/** Namespace names become file names (their secret files), hence the tight alphabet. */
const NAMESPACE_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
export const MAX_DIGEST_CHARS = 256;
export const MAX_ADDRESS_CHARS = 1024;
export const MAX_META_KEYS = 32;
export const MAX_META_KEY_CHARS = 64;
export const MAX_META_VALUE_CHARS = 256;

export function checkNamespace(ns: unknown): asserts ns is string {
  if (typeof ns !== 'string' || !NAMESPACE_RE.test(ns)) {
    throw invalidArgument(
      `invalid KVS namespace ${typeof ns === 'string' ? JSON.stringify(ns.slice(0, 200)) : typeof ns}: ` +
        'use 1-128 characters from A-Z a-z 0-9 . _ - starting with a letter or digit',
    );
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function intField(o: Record<string, unknown>, name: string, min: number, max: number, what: string): number {
  const v = o[name];
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    throw invalidArgument(`${what}: ${name} must be an integer from ${min} to ${max}, got ${JSON.stringify(v) ?? typeof v}`);
  }
  return v;
}

export function checkPublishInput(rec: unknown): PublishInput {
  const what = 'invalid file record';
  if (!isObject(rec)) throw invalidArgument(`${what}: not an object`);
  const owner = intField(rec, 'owner', 0, 0x7fffffff, what);
  const size = intField(rec, 'size', 0, Number.MAX_SAFE_INTEGER, what);
  const mode = intField(rec, 'mode', 0, 0o177777, what);
  const mtimeMs = rec['mtimeMs'];
  if (typeof mtimeMs !== 'number' || !Number.isFinite(mtimeMs)) {
    throw invalidArgument(`${what}: mtimeMs must be a finite number`);
  }
  const digest = rec['digest'];
  if (typeof digest !== 'string' || digest.length > MAX_DIGEST_CHARS || !/^[\x21-\x7e]*$/.test(digest)) {
    throw invalidArgument(`${what}: digest must be printable ASCII without spaces, at most ${MAX_DIGEST_CHARS} characters`);
  }
  return { owner, size, mode, mtimeMs, digest };
}

export function checkRank(rank: unknown): asserts rank is number {
  if (typeof rank !== 'number' || !Number.isInteger(rank) || rank < 0 || rank > 0x7fffffff) {
    throw invalidArgument(`invalid rank ${JSON.stringify(rank) ?? typeof rank}: must be a non-negative integer`);
  }
}

export function checkRankInfo(info: unknown): RankInfo {
  const what = 'invalid rank entry';
  if (!isObject(info)) throw invalidArgument(`${what}: not an object`);
  checkRank(info['rank']);
  const address = info['address'];
  if (typeof address !== 'string' || address === '' || address.length > MAX_ADDRESS_CHARS) {
    throw invalidArgument(`${what}: address must be a non-empty string of at most ${MAX_ADDRESS_CHARS} characters`);
  }
  const out: RankInfo = { rank: info['rank'], address };
  const meta = info['meta'];
  if (meta !== undefined) {
    if (!isObject(meta)) throw invalidArgument(`${what}: meta must be an object of strings`);
    const keys = Object.keys(meta);
    if (keys.length > MAX_META_KEYS) throw invalidArgument(`${what}: meta has more than ${MAX_META_KEYS} keys`);
    const clean: Array<[string, string]> = [];
    for (const k of keys) {
      const v = meta[k];
      if (k.length > MAX_META_KEY_CHARS || typeof v !== 'string' || v.length > MAX_META_VALUE_CHARS) {
        throw invalidArgument(
          `${what}: meta keys must be at most ${MAX_META_KEY_CHARS} and values strings of at most ${MAX_META_VALUE_CHARS} characters`,
        );
      }
      clean.push([k, v]);
    }
    // fromEntries defines own properties, so a key like "__proto__" stays data.
    out.meta = Object.fromEntries(clean);
  }
  return out;
}
