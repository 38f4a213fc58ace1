/**
 * Transfer-layer pieces that need no network: the digest (known CRC-32
 * vectors, chaining, JS fallback agreeing with zlib, whole-file digests),
 * DYAD_DTL_MODE parsing, the wire framing, and the confined open
 * (lexical refusals, symlink components, FIFOs).
 */
import t from 'tap';
import { closeSync, fstatSync, mkdirSync, mkdtempSync, openSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError, errnos } from '../src/errors.js';
import { backendFor } from '../src/dtl/index.js';
import { ucxAvailable } from '../src/dtl/index.js';
import { openBeneath, splitUpath } from '../src/dtl/confine.js';
import { DIGEST_ALGO, Digester, algoOf, crc32IsNative, crc32Js, crc32cIsNative, crc32cJs, digestBuffer, digestFile, formatDigest, isDigest, sameDigest } from '../src/dtl/digest.js';
import { addon } from '../src/dtl/addon.js';
import {
  FrameReader,
  FrameType,
  MAX_PAYLOAD,
  ProtocolError,
  decodeData,
  decodeGet,
  encodeFrame,
  encodeGet,
  formatAddress,
  parseAddress,
  parseFrame,
  writeDataHeader,
} from '../src/dtl/tcp/protocol.js';

function tmp(t: { teardown: (fn: () => void) => void }): string {
  const d = mkdtempSync(join(tmpdir(), 'dyad-dtl-'));
  t.teardown(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

t.test('digests: CRC-32C by default, CRC-32 still verified', async (t) => {
  t.ok(crc32IsNative, 'zlib.crc32 is available on this Node');
  t.ok(crc32cIsNative, 'the addon provides CRC-32C');
  t.equal(DIGEST_ALGO, 'crc32c', 'new digests use CRC-32C');
  t.equal(digestBuffer(Buffer.from('123456789')), 'crc32c:e3069283', 'CRC-32C standard check value');
  t.equal(digestBuffer(Buffer.from('123456789'), 'crc32'), 'crc32:cbf43926', 'CRC-32 standard check value');
  t.equal(digestBuffer(Buffer.alloc(0)), 'crc32c:00000000');
  t.equal(digestBuffer(Buffer.alloc(0), 'crc32'), 'crc32:00000000');
  // Lengths around the addon's 3 x 4 KiB blocks, so the joined streams are checked too.
  const data = randomBytes((5 << 20) + 3);
  for (const algo of ['crc32c', 'crc32'] as const) {
    const whole = digestBuffer(data, algo);
    const d = new Digester(algo);
    for (let o = 0; o < data.length; o += 77_777) d.update(data.subarray(o, o + 77_777));
    t.equal(d.digest(), whole, `${algo}: chained over chunks equals one pass`);
    t.equal(d.bytes, data.length);
    t.equal(algoOf(whole), algo);
    t.ok(isDigest(whole));
    const js = algo === 'crc32c' ? crc32cJs : crc32Js;
    for (const n of [0, 1, 7, 8, 9, 1000, 12_287, 12_288, 12_289, 65_537, 1 << 20]) {
      const b = data.subarray(0, n);
      t.equal(formatDigest(js(b, 0), algo), digestBuffer(b, algo), `${algo}: JS fallback agrees with native, ${n} bytes`);
    }
    t.equal(formatDigest(js(data.subarray(100), js(data.subarray(0, 100), 0)), algo), whole, `${algo}: JS fallback chains`);
  }
  const c = addon.crc32c!;
  t.equal(c(data, 0, true), c(data, 0, false), "the addon's table path equals its instruction path");
  t.equal(c(data.subarray(5000), c(data.subarray(0, 5000), 0, true), true), c(data), 'the table path chains');
  t.notOk(isDigest('sha1:abc'));
  t.notOk(isDigest('crc32c:abc'));
  t.ok(sameDigest('crc32:CBF43926', 'crc32:cbf43926'));
});

t.test('digestFile by path and by fd', async (t) => {
  const dir = tmp(t);
  const data = randomBytes((3 << 20) + 11);
  const p = join(dir, 'f');
  writeFileSync(p, data);
  t.same(await digestFile(p), { digest: digestBuffer(data), size: data.length });
  const fd = openSync(p, 'r');
  try {
    t.same(await digestFile(fd), { digest: digestBuffer(data), size: data.length });
  } finally {
    closeSync(fd);
  }
});

t.test('backendFor follows DYAD_DTL_MODE prefix matching', async (t) => {
  for (const m of ['', 'F', 'FLUX', 'FLUX_RPC', 'T', 'TCP']) t.equal(backendFor(m).name, 'tcp', `"${m}" selects TCP`);
  for (const m of ['U', 'UCX']) {
    if (ucxAvailable()) t.equal(backendFor(m).name, 'ucx', `"${m}" selects UCX`);
    else t.throws(() => backendFor(m), { name: 'ConfigError', code: 'DYAD_ECONFIG', message: /UCX transport not built/ }, `"${m}" is UCX, not built`);
  }
  for (const m of ['flux', 'FLUX_RPCX', 'X', 'ucx']) {
    let err: unknown;
    try {
      backendFor(m);
    } catch (e) {
      err = e;
    }
    t.ok(err instanceof ConfigError, `"${m}" is refused`);
    const msg = err instanceof Error ? err.message : '';
    t.ok(msg.includes(JSON.stringify(m)) && msg.includes('FLUX_RPC') && msg.includes('TCP'), `message names "${m}" and the allowed modes: ${msg}`);
  }
});

t.test('framing', async (t) => {
  const get = encodeGet(7, 'dir/file');
  // Split anywhere: the reader must reassemble.
  const r = new FrameReader();
  t.same(r.push(get.subarray(0, 3)), []);
  const frames = r.push(Buffer.concat([get.subarray(3), get]));
  t.equal(frames.length, 2);
  t.same(decodeGet(frames[0]!.payload), { id: 7, upath: 'dir/file' });
  const head = Buffer.alloc(17);
  writeDataHeader(head, 9, 2 ** 40 + 5);
  const f = parseFrame(head, 0, head.length);
  t.equal(f?.frame.type, FrameType.data);
  t.same(decodeData(f!.frame.payload), { id: 9, size: 2 ** 40 + 5 });
  const huge = Buffer.alloc(5);
  huge.writeUInt32BE(MAX_PAYLOAD + 1, 0);
  huge[4] = FrameType.get;
  t.throws(() => parseFrame(huge, 0, 5), ProtocolError, 'oversized length rejected from the header alone');
  t.throws(() => parseFrame(Buffer.from([0, 0, 0, 0, 99]), 0, 5), ProtocolError, 'unknown type');
  t.throws(() => encodeFrame(FrameType.denied, Buffer.alloc(MAX_PAYLOAD + 1)), ProtocolError);
  t.same(parseAddress('127.0.0.1:80'), { host: '127.0.0.1', port: 80 });
  t.same(parseAddress('[::1]:9'), { host: '::1', port: 9 });
  t.equal(formatAddress('::1', 9), '[::1]:9');
  for (const bad of ['nohost', 'h:0', 'h:70000', '::1:5']) t.throws(() => parseAddress(bad), ProtocolError, bad);
});

t.test('upath validation', async (t) => {
  t.same(splitUpath('a/b/c.txt'), ['a', 'b', 'c.txt']);
  t.same(splitUpath('..a/b..'), ['..a', 'b..'], 'dots inside names are fine');
  for (const bad of ['', '/etc/passwd', '../x', 'a/../../x', 'a//b', './a', 'a/.', 'a/', 'a\0b', 'x'.repeat(256), 'a/'.repeat(2100) + 'b']) {
    t.throws(() => splitUpath(bad), { code: 'DYAD_EFORBIDDEN', errno: errnos.EACCES }, JSON.stringify(bad.slice(0, 20)));
  }
});

t.test('openBeneath refuses symlink components and does not block on FIFOs', async (t) => {
  const dir = tmp(t);
  const root = join(dir, 'root');
  mkdirSync(join(root, 'sub'), { recursive: true });
  writeFileSync(join(root, 'sub', 'f'), 'ok');
  writeFileSync(join(dir, 'outside'), 'secret');
  symlinkSync(join(dir, 'outside'), join(root, 'esc'));
  symlinkSync(dir, join(root, 'escdir'));
  symlinkSync('sub', join(root, 'inner'));
  const fd = openBeneath(root, 'sub/f');
  t.ok(fstatSync(fd).isFile());
  closeSync(fd);
  const forbidden = { code: 'DYAD_EFORBIDDEN' };
  t.throws(() => openBeneath(root, 'esc'), forbidden, 'final symlink out of root');
  t.throws(() => openBeneath(root, 'escdir/outside'), forbidden, 'directory symlink out of root');
  t.throws(() => openBeneath(root, 'inner/f'), forbidden, 'even a symlink that stays inside');
  t.throws(() => openBeneath(root, 'nope'), { code: 'ENOENT' });
  t.throws(() => openBeneath(root, 'sub/f/x'), { code: 'ENOTDIR' });
  execFileSync('mkfifo', [join(root, 'fifo')]);
  const ff = openBeneath(root, 'fifo');
  t.ok(fstatSync(ff).isFIFO(), 'opened without blocking; the server refuses it as not regular');
  closeSync(ff);
});
