/**
 * MurmurHash3_x64_128, in two flavours: DYAD's (the default) and the standard one.
 *
 * DYAD's copy of murmur3.c has a `break;` after every case of the tail switch
 * (commit e43f65e), so for a tail length (len % 16) of 2-8 or 10-15 the tail bytes
 * are ignored and for 1 or 9 only the last tail byte is mixed in. DYAD keys must be
 * bit-identical to a real deployment's, so the quirk is the default; `standard: true`
 * restores the intended fall-through.
 *
 * 64-bit lanes are kept as pairs of uint32 halves because BigInt arithmetic is an
 * order of magnitude slower and key generation runs once per lookup and publish.
 * The helpers below return through a two-word register (R) to avoid
 * allocating a pair per operation. It is a Uint32Array, not two module-level
 * `let`s: a number above 2^31 stored in a module variable is boxed, so each
 * store allocated (about 4 KiB of garbage per published file, measured with V8's
 * sampling heap profiler on a publishing daemon).
 */

export interface Murmur3Options {
  /** Restore the standard tail fall-through (not DYAD-compatible). */
  standard?: boolean;
}

// Result register of the 64-bit helpers: [high, low].
const R = new Uint32Array(2);

function mul64(ah: number, al: number, bh: number, bl: number): void {
  // Low 32x32 -> 64 product by 16-bit limbs; the cross terms only matter mod 2^32.
  const a0 = al & 0xffff;
  const a1 = al >>> 16;
  const b0 = bl & 0xffff;
  const b1 = bl >>> 16;
  const p00 = a0 * b0;
  const p01 = a0 * b1;
  const p10 = a1 * b0;
  const mid = (p00 >>> 16) + (p01 & 0xffff) + (p10 & 0xffff);
  const hi = a1 * b1 + (p01 >>> 16) + (p10 >>> 16) + (mid >>> 16);
  R[1] = ((mid << 16) | (p00 & 0xffff)) >>> 0;
  R[0] = (hi + Math.imul(ah, bl) + Math.imul(al, bh)) >>> 0;
}

function add64(ah: number, al: number, bh: number, bl: number): void {
  const lo = al + bl;
  R[1] = lo >>> 0;
  R[0] = (ah + bh + (lo > 0xffffffff ? 1 : 0)) >>> 0;
}

/** Rotate left by r, 0 < r < 32. */
function rotl64(h: number, l: number, r: number): void {
  R[0] = ((h << r) | (l >>> (32 - r))) >>> 0;
  R[1] = ((l << r) | (h >>> (32 - r))) >>> 0;
}

// c1 = 0x87c37b91114253d5, c2 = 0x4cf5ad432745937f
const C1H = 0x87c37b91;
const C1L = 0x114253d5;
const C2H = 0x4cf5ad43;
const C2L = 0x2745937f;

/** k1 *= c1; k1 = rotl(k1, 31); k1 *= c2 */
function mixK1(h: number, l: number): void {
  mul64(h, l, C1H, C1L);
  rotl64(R[0]!, R[1]!, 31);
  mul64(R[0]!, R[1]!, C2H, C2L);
}

/** k2 *= c2; k2 = rotl(k2, 33); k2 *= c1 (a rotation by 33 is a swap plus 1) */
function mixK2(h: number, l: number): void {
  mul64(h, l, C2H, C2L);
  rotl64(R[1]!, R[0]!, 1);
  mul64(R[0]!, R[1]!, C1H, C1L);
}

function fmix64(h: number, l: number): void {
  // k ^= k >> 33 only touches the low half, with bits from the high half.
  l = (l ^ (h >>> 1)) >>> 0;
  mul64(h, l, 0xff51afd7, 0xed558ccd);
  h = R[0]!;
  l = (R[1]! ^ (R[0]! >>> 1)) >>> 0;
  mul64(h, l, 0xc4ceb9fe, 0x1a85ec53);
  h = R[0]!;
  l = (R[1]! ^ (R[0]! >>> 1)) >>> 0;
  R[0] = h;
  R[1] = l;
}

/** k *= 5, as k + (k << 2). */
function times5(h: number, l: number): void {
  add64(h, l, ((h << 2) | (l >>> 30)) >>> 0, (l << 2) >>> 0);
}

// The last block mixed: its four input words, then k1 (high, low) and k2
// (high, low) after mixing. The mix does not depend on the seed or on the
// blocks around it, and DYAD pads every key's path to 128 bytes with '@':
// most blocks hashed are that same padding block, for every path and at
// every level of the key: its mix is computed once and reused.
const LAST = new Uint32Array(8);
mixBlock(0, 0, 0, 0);

function mixBlock(w0: number, w1: number, w2: number, w3: number): void {
  LAST[0] = w0;
  LAST[1] = w1;
  LAST[2] = w2;
  LAST[3] = w3;
  mixK1(w1, w0);
  LAST[4] = R[0]!;
  LAST[5] = R[1]!;
  mixK2(w3, w2);
  LAST[6] = R[0]!;
  LAST[7] = R[1]!;
}

function u32le(b: Uint8Array, i: number): number {
  return (b[i]! | (b[i + 1]! << 8) | (b[i + 2]! << 16) | (b[i + 3]! << 24)) >>> 0;
}

/**
 * The 128-bit hash as four little-endian uint32 words [h0, h1, h2, h3], i.e. the
 * low and high halves of the C function's out[0] and out[1]; this is how DYAD's
 * gen_path_key reads the output. Writes into `out` when given (no allocation).
 */
export function murmur3x64_128Words(
  data: Uint8Array,
  seed: number,
  opts?: Murmur3Options,
  out: Uint32Array = new Uint32Array(4),
): Uint32Array {
  const len = data.length;
  const nblocks = len >>> 4;
  let h1h = 0;
  let h1l = seed >>> 0;
  let h2h = 0;
  let h2l = seed >>> 0;

  for (let i = 0; i < nblocks; i++) {
    const o = i << 4;
    const w0 = u32le(data, o);
    const w1 = u32le(data, o + 4);
    const w2 = u32le(data, o + 8);
    const w3 = u32le(data, o + 12);
    if (w0 !== LAST[0] || w1 !== LAST[1] || w2 !== LAST[2] || w3 !== LAST[3]) mixBlock(w0, w1, w2, w3);
    h1h = (h1h ^ LAST[4]!) >>> 0;
    h1l = (h1l ^ LAST[5]!) >>> 0;
    rotl64(h1h, h1l, 27);
    add64(R[0]!, R[1]!, h2h, h2l);
    times5(R[0]!, R[1]!);
    add64(R[0]!, R[1]!, 0, 0x52dce729);
    h1h = R[0]!;
    h1l = R[1]!;

    h2h = (h2h ^ LAST[6]!) >>> 0;
    h2l = (h2l ^ LAST[7]!) >>> 0;
    rotl64(h2h, h2l, 31);
    add64(R[0]!, R[1]!, h1h, h1l);
    times5(R[0]!, R[1]!);
    add64(R[0]!, R[1]!, 0, 0x38495ab5);
    h2h = R[0]!;
    h2l = R[1]!;
  }

  const tail = nblocks << 4;
  const rem = len & 15;
  if (opts?.standard === true) {
    if (rem > 8) {
      let kh = 0;
      let kl = 0;
      for (let j = rem - 1; j >= 8; j--) {
        const byte = data[tail + j]!;
        const shift = (j - 8) * 8;
        if (shift >= 32) kh |= byte << (shift - 32);
        else kl |= byte << shift;
      }
      mixK2(kh >>> 0, kl >>> 0);
      h2h = (h2h ^ R[0]!) >>> 0;
      h2l = (h2l ^ R[1]!) >>> 0;
    }
    if (rem > 0) {
      let kh = 0;
      let kl = 0;
      for (let j = Math.min(rem, 8) - 1; j >= 0; j--) {
        const byte = data[tail + j]!;
        if (j >= 4) kh |= byte << ((j - 4) * 8);
        else kl |= byte << (j * 8);
      }
      mixK1(kh >>> 0, kl >>> 0);
      h1h = (h1h ^ R[0]!) >>> 0;
      h1l = (h1l ^ R[1]!) >>> 0;
    }
  } else if (rem === 9) {
    // DYAD: `case 9` mixes tail[8] alone, then breaks before the k1 cases.
    mixK2(0, data[tail + 8]!);
    h2h = (h2h ^ R[0]!) >>> 0;
    h2l = (h2l ^ R[1]!) >>> 0;
  } else if (rem === 1) {
    mixK1(0, data[tail]!);
    h1h = (h1h ^ R[0]!) >>> 0;
    h1l = (h1l ^ R[1]!) >>> 0;
  }

  // h ^= len: DYAD passes an int length; lengths beyond 2^32 are not hashed here.
  h1l = (h1l ^ len) >>> 0;
  h2l = (h2l ^ len) >>> 0;
  add64(h1h, h1l, h2h, h2l);
  h1h = R[0]!;
  h1l = R[1]!;
  add64(h2h, h2l, h1h, h1l);
  h2h = R[0]!;
  h2l = R[1]!;
  fmix64(h1h, h1l);
  h1h = R[0]!;
  h1l = R[1]!;
  fmix64(h2h, h2l);
  h2h = R[0]!;
  h2l = R[1]!;
  add64(h1h, h1l, h2h, h2l);
  h1h = R[0]!;
  h1l = R[1]!;
  add64(h2h, h2l, h1h, h1l);
  h2h = R[0]!;
  h2l = R[1]!;

  out[0] = h1l;
  out[1] = h1h;
  out[2] = h2l;
  out[3] = h2h;
  return out;
}

/** The hash as the C function's two uint64 outputs. Strings are hashed as UTF-8. */
export function murmur3x64_128(
  data: Uint8Array | string,
  seed = 0,
  opts?: Murmur3Options,
): { h1: bigint; h2: bigint } {
  const bytes = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
  const w = murmur3x64_128Words(bytes, seed, opts);
  return {
    h1: (BigInt(w[1]!) << 32n) | BigInt(w[0]!),
    h2: (BigInt(w[3]!) << 32n) | BigInt(w[2]!),
  };
}
