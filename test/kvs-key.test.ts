/**
 * DYAD key compatibility: the murmur3 variant (reference string, and vectors
 * from an independent C build of murmur3.c with and without DYAD's tail
 * `break`s), every gen_path_key vector of dyad.md §3, parameter validation and
 * upath helpers.
 */
import t from 'tap';
import { ConfigError } from '../src/errors.js';
import { checkUpath, genPathKey, keyParamsFromEnv, murmur3x64_128, parentOf, upathOf } from '../src/kvs/index.js';

const hex = (v: bigint): string => v.toString(16).padStart(16, '0');

t.test('murmur3 reference string, seed 0', async (t) => {
  const fox = 'The quick brown fox jumps over the lazy dog';
  const dyad = murmur3x64_128(fox, 0);
  t.equal(hex(dyad.h1), '8e9fc4773afffff2');
  t.equal(hex(dyad.h2), 'f00cd87c9eba3dec');
  const std = murmur3x64_128(fox, 0, { standard: true });
  t.equal(hex(std.h1), 'e34bbc7bbc071b6c');
  t.equal(hex(std.h2), '7a433ca9c49a9347');
});

t.test('murmur3 tail handling matches C, seed 57', async (t) => {
  // bytes[i] = (i * 131 + 7) & 255; [length, DYAD h1, h2, standard h1, h2]
  const bytes = Uint8Array.from({ length: 137 }, (_, i) => (i * 131 + 7) & 255);
  const vectors: Array<[number, string, string, string, string]> = [
    [0, 'af1b837175bf486b', 'eb71228cc738b9e6', 'af1b837175bf486b', 'eb71228cc738b9e6'],
    [1, '18a576113ef5d4a8', '15d59c2734f09a71', '18a576113ef5d4a8', '15d59c2734f09a71'],
    [9, '709e81833d6c3570', '6718d4a38930668c', 'acd794d72b79306e', 'be3b1dde65e1a083'],
    [15, 'df60e115057fda52', 'eb3bede3f71ed9b1', 'cafe4d53364fdb64', '3f187e5232a08935'],
    [16, 'e9ec706631094c6f', '7b3cc6813f2c0ed9', 'e9ec706631094c6f', '7b3cc6813f2c0ed9'],
    [25, 'fcc61fe79251d7ce', '1230de379508ed4c', '80819c431e511cc2', 'afa87322b49553ff'],
    [31, 'fab2d893c7ac47e2', 'dd6f62b4f53b24e7', '6df92b352141a2a1', '1aab16e13302c7d1'],
    [128, 'db723311c37e3da4', '381c44737909fbd8', 'db723311c37e3da4', '381c44737909fbd8'],
    [137, '1e8090198754ea3d', 'eeaefae1aee0a358', '4061bed1be17c834', 'f589b28118dae695'],
  ];
  for (const [len, h1, h2, s1, s2] of vectors) {
    const data = bytes.subarray(0, len);
    const d = murmur3x64_128(data, 57);
    const s = murmur3x64_128(data, 57, { standard: true });
    t.same([hex(d.h1), hex(d.h2)], [h1, h2], `DYAD variant, length ${len}`);
    t.same([hex(s.h1), hex(s.h2)], [s1, s2], `standard variant, length ${len}`);
  }
});

t.test('gen_path_key vectors of dyad.md §3', async (t) => {
  t.equal(genPathKey('1/data0.txt', 3, 1024), '263.2ce.2e1.1/data0.txt');
  t.equal(genPathKey('data0.txt', 3, 1024), '17f.204.15b.data0.txt');
  t.equal(genPathKey('prod-cons/data0.txt', 3, 1024), '2dd.32c.34.prod-cons/data0.txt');
  t.equal(genPathKey('data0.txt', 2, 256), '7f.4.data0.txt');
  t.equal(genPathKey('file0.npy', 3, 1024), '141.f6.129.file0.npy');
  t.equal(genPathKey('a', 1, 1), '0.a');
  for (const bins of [1, 7, 1024, 0xffffffff]) t.equal(genPathKey('x/y/z.bin', 0, bins), 'x/y/z.bin');
  t.equal(genPathKey('1/data0.txt'), '263.2ce.2e1.1/data0.txt', 'defaults are depth 3, bins 1024');
});

t.test('gen_path_key on long and multi-byte upaths', async (t) => {
  const long = 'd/'.repeat(70) + 'f'; // 141 bytes: hashed unpadded, with the quirky tail
  const key = genPathKey(long);
  t.match(key, /^[0-9a-f]{1,3}\.[0-9a-f]{1,3}\.[0-9a-f]{1,3}\.d\/d\//);
  t.ok(key.endsWith(long));
  t.equal(genPathKey(long), key, 'deterministic');
  // Padding counts UTF-8 bytes: 'é' is two bytes, so these two hash differently.
  t.not(genPathKey('é'.repeat(64)), genPathKey('e'.repeat(64)));
  t.ok(genPathKey('é'.repeat(64)).endsWith('é'.repeat(64)));
});

t.test('key parameter validation', async (t) => {
  t.throws(() => genPathKey('a', 3, 0), ConfigError);
  t.throws(() => genPathKey('a', -1, 4), ConfigError);
  t.throws(() => genPathKey('a', 1.5, 4), ConfigError);
  t.same(keyParamsFromEnv({}), { depth: 3, bins: 1024 });
  t.same(keyParamsFromEnv({ DYAD_KEY_DEPTH: '2', DYAD_KEY_BINS: '256' }), { depth: 2, bins: 256 });
  t.throws(() => keyParamsFromEnv({ DYAD_KEY_BINS: '0' }), { name: 'ConfigError', message: /DYAD_KEY_BINS=0.*at least 1/ });
  t.throws(() => keyParamsFromEnv({ DYAD_KEY_DEPTH: '-1' }), ConfigError);
  t.throws(() => keyParamsFromEnv({ DYAD_KEY_DEPTH: '3x' }), ConfigError);
});

t.test('key generation is fast enough for 100k keys/s', async (t) => {
  const n = 20_000;
  const start = performance.now();
  for (let i = 0; i < n; i++) genPathKey(`run/${i}/data.npy`);
  const perSecond = n / ((performance.now() - start) / 1000);
  t.comment(`${Math.round(perSecond)} keys/s`);
  t.pass();
});

t.test('upath helpers', async (t) => {
  for (const bad of ['/a', 'a/', 'a//b', './a', 'a/../b', '..', 'a\0b', 'x/' + 'n'.repeat(256)]) {
    t.throws(() => checkUpath(bad), { code: 'DYAD_EINVAL' }, JSON.stringify(bad));
  }
  t.throws(() => checkUpath(''), { code: 'DYAD_EINVAL' });
  t.doesNotThrow(() => checkUpath('', true));
  t.doesNotThrow(() => checkUpath('a/b c/é.txt'));
  t.equal(parentOf('a/b/c'), 'a/b');
  t.equal(parentOf('a'), '');
  t.equal(upathOf('/dmd', '/dmd/a/b'), 'a/b');
  t.equal(upathOf('/dmd/', '/dmd'), '');
  t.equal(upathOf('/dmd', '/dmd2/a'), undefined);
  t.equal(upathOf('/dmd', '/dmd/../x'), undefined);
  t.equal(upathOf('/dmd', 'rel/x'), 'rel/x');
  t.equal(upathOf('/dmd', '/dmd//a/./b/'), 'a/b');
});
