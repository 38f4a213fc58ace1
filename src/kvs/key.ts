/**
 * DYAD's KVS key for a upath (reference §3): `<bin0>.<bin1>...<upath>`, one hex bin
 * per level of murmur3 hashing. Keys must match DYAD's gen_path_key bit for bit so
 * that a deployment can share a namespace layout with real DYAD tooling.
 */
import { ConfigError } from '../errors.js';
import { murmur3x64_128Words } from './murmur3.js';

/** DYAD's per-level seed increments; the seed is their running sum from 57. */
export const DYAD_KEY_SEEDS: readonly number[] = [
  104677, 104681, 104683, 104693, 104701, 104707, 104711, 104717, 104723, 104729,
];
export const DEFAULT_KEY_DEPTH = 3;
export const DEFAULT_KEY_BINS = 1024;
/** Deeper keys buy nothing and make every key longer; DYAD itself uses 1-3. */
export const MAX_KEY_DEPTH = 64;
/** DYAD keeps bins in a uint32. */
export const MAX_KEY_BINS = 0xffffffff;

const PAD_TO = 128;
const PAD_BYTE = 0x40; // '@'

export interface KeyParams {
  depth: number;
  bins: number;
}

/** Throws ConfigError unless depth and bins are usable key parameters. */
export function checkKeyParams(depth: number, bins: number, source = 'key'): void {
  if (!Number.isInteger(depth) || depth < 0 || depth > MAX_KEY_DEPTH) {
    throw new ConfigError(`${source} depth ${String(depth)} is invalid: it must be an integer from 0 to ${MAX_KEY_DEPTH}`);
  }
  if (!Number.isInteger(bins) || bins < 1 || bins > MAX_KEY_BINS) {
    throw new ConfigError(
      `${source} bins ${String(bins)} is invalid: the number of bins per level must be an integer from 1 to ${MAX_KEY_BINS}` +
        (bins === 0 ? ' (DYAD would divide by zero)' : ''),
    );
  }
}

// Reused for the common case (upath < 128 bytes) so key generation allocates only the result.
const scratch = Buffer.alloc(PAD_TO);
const words = new Uint32Array(4);

/** gen_path_key(upath, depth, bins). */
export function genPathKey(upath: string, depth: number = DEFAULT_KEY_DEPTH, bins: number = DEFAULT_KEY_BINS): string {
  checkKeyParams(depth, bins);
  if (depth === 0) return upath;
  let bytes: Uint8Array;
  if (upath.length < PAD_TO && Buffer.byteLength(upath, 'utf8') < PAD_TO) {
    const n = scratch.write(upath, 0, 'utf8');
    scratch.fill(PAD_BYTE, n);
    bytes = scratch;
  } else {
    bytes = Buffer.from(upath, 'utf8');
  }
  let seed = 57;
  let key = '';
  for (let d = 0; d < depth; d++) {
    seed = (seed + DYAD_KEY_SEEDS[d % DYAD_KEY_SEEDS.length]!) >>> 0;
    murmur3x64_128Words(bytes, seed, undefined, words);
    const bin = ((words[0]! ^ words[1]! ^ words[2]! ^ words[3]!) >>> 0) % bins;
    key += bin.toString(16) + '.';
  }
  return key + upath;
}

function envInt(env: NodeJS.ProcessEnv, name: string, fallback: number): number {
  const raw = env[name];
  if (raw === undefined || raw.trim() === '') return fallback;
  // DYAD uses atoi; we reject what atoi would silently misread.
  if (!/^\s*\d+\s*$/.test(raw)) throw new ConfigError(`${name}=${JSON.stringify(raw)} is not a non-negative integer`);
  return Number(raw.trim());
}

/** DYAD_KEY_DEPTH / DYAD_KEY_BINS with DYAD's defaults (3, 1024), validated. */
export function keyParamsFromEnv(env: NodeJS.ProcessEnv = process.env): KeyParams {
  const depth = envInt(env, 'DYAD_KEY_DEPTH', DEFAULT_KEY_DEPTH);
  const bins = envInt(env, 'DYAD_KEY_BINS', DEFAULT_KEY_BINS);
  if (depth > MAX_KEY_DEPTH) throw new ConfigError(`DYAD_KEY_DEPTH=${depth} is invalid: at most ${MAX_KEY_DEPTH} levels`);
  if (bins === 0) {
    throw new ConfigError('DYAD_KEY_BINS=0 is invalid: the number of bins per key level must be at least 1');
  }
  checkKeyParams(depth, bins, 'DYAD_KEY');
  return { depth, bins };
}
