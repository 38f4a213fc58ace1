/**
 * Read-through from an origin (--origin, DYAD_PATH_ORIGIN), the
 * deep-learning case: a dataset on shared storage, sharded over the nodes'
 * local storage as it is read. Real mounts, plain shell tools.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { cluster, dyadMountBin, isMountedAt, mountCli, sh, smallTmpfs, tmpdir } from './helpers/mount.js';

const logLines = (log: string, re: RegExp) => fs.readFileSync(log, 'utf8').split('\n').filter((l) => re.test(l));

function dataset(base: string): { origin: string; sample: Buffer } {
  const origin = path.join(base, 'origin');
  fs.mkdirSync(path.join(origin, 'train', 'sub'), { recursive: true });
  const sample = randomBytes((2 << 20) + 777);
  fs.writeFileSync(path.join(origin, 'train', 'a.bin'), sample);
  fs.writeFileSync(path.join(origin, 'train', 'b.txt'), 'bee\n');
  fs.writeFileSync(path.join(origin, 'train', 'sub', 'c.txt'), 'sea\n');
  fs.chmodSync(path.join(origin, 'train', 'b.txt'), 0o640);
  fs.utimesSync(path.join(origin, 'train', 'b.txt'), new Date('2020-02-02T02:02:02Z'), new Date('2020-02-02T02:02:02Z'));
  return { origin, sample };
}

t.test('names in the origin show before any byte moves; the first reader copies and publishes, the next node pulls from it', async (t) => {
  const base = tmpdir(t);
  const { origin, sample } = dataset(base);
  const c = await cluster(t, 2, ['--origin', origin, '--log-level', 'debug']);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];

  t.same(fs.readdirSync(path.join(p.mnt, 'train')).sort(), ['a.bin', 'b.txt', 'sub'], 'readdir lists the origin');
  t.notOk(fs.existsSync(path.join(p.storage, 'train', 'sub')), 'a listing looks nothing up (the origin directory was not made locally)');
  const st = fs.statSync(path.join(q.mnt, 'train', 'b.txt'));
  t.equal(st.size, 4);
  t.equal(st.mode & 0o7777, 0o640, 'mode from the origin');
  t.equal(st.mtime.toISOString(), '2020-02-02T02:02:02.000Z', 'mtime from the origin');
  const ls = await sh(`ls -l ${path.join(p.mnt, 'train')}`);
  t.match(ls.stdout, new RegExp(`${sample.length} .* a\\.bin`), 'ls -l shows the size');
  t.notOk(fs.existsSync(path.join(p.storage, 'train', 'a.bin')), 'stat and ls copied nothing');

  // Node 0 reads it first: copied from the origin, published as node 0's.
  t.ok(fs.readFileSync(path.join(p.mnt, 'train', 'a.bin')).equals(sample), 'node 0 reads the origin bytes');
  t.ok(fs.readFileSync(path.join(p.storage, 'train', 'a.bin')).equals(sample), 'now in node 0 storage');
  t.equal(logLines(p.log, /copied train\/a\.bin .* from the origin/).length, 1);
  t.equal(fs.statSync(path.join(p.storage, 'train', 'b.txt'), { throwIfNoEntry: false }), undefined, 'only what was read is copied');

  // Node 1 gets it from node 0, not from the origin: it is gone from there.
  fs.rmSync(path.join(origin, 'train', 'a.bin'));
  t.ok(fs.readFileSync(path.join(q.mnt, 'train', 'a.bin')).equals(sample), 'node 1 reads the same bytes');
  t.equal(logLines(q.log, /pulled train\/a\.bin .* from rank 0/).length, 1, 'pulled from node 0');
  t.equal(logLines(q.log, /from the origin/).length, 0, 'not copied from the origin');

  // Nested names, read on node 1 first; the copy keeps mode and mtime.
  t.equal(fs.readFileSync(path.join(q.mnt, 'train', 'sub', 'c.txt'), 'utf8'), 'sea\n');
  t.equal(fs.readFileSync(path.join(q.mnt, 'train', 'b.txt'), 'utf8'), 'bee\n');
  const local = fs.statSync(path.join(q.storage, 'train', 'b.txt'));
  t.equal(local.mode & 0o7777, 0o640, 'copy keeps the mode');
  t.equal(local.mtime.toISOString(), '2020-02-02T02:02:02.000Z', 'copy keeps the mtime');
  t.equal(fs.readFileSync(path.join(p.mnt, 'train', 'b.txt'), 'utf8'), 'bee\n', 'and node 0 reads node 1\'s copy');
  t.equal(logLines(p.log, /copied train\/b\.txt/).length, 0);
  const parts = (dir: string) => fs.readdirSync(dir, { recursive: true }).filter((n) => String(n).includes('.dyad-part'));
  t.same(parts(p.storage), [], 'no temp files');
  t.same(parts(q.storage), []);
});

t.test('concurrent readers of one origin file on a node cause one copy', async (t) => {
  const base = tmpdir(t);
  const { origin, sample } = dataset(base);
  // Readers that race for a name not cached by the kernel can hold
  // different placeholders for it, and open after the first copy is done:
  // several files, so that a second copy has many chances to show.
  const extra = Array.from({ length: 12 }, (_, i) => `r${i}.bin`);
  for (const n of extra) fs.writeFileSync(path.join(origin, 'train', n), randomBytes(2 << 20));
  const c = await cluster(t, 1, ['--origin', origin, '--log-level', 'debug']);
  const p = c.nodes[0]!;
  for (const n of ['a.bin', ...extra]) {
    const readers = Array.from({ length: 8 }, () => sh(`md5sum ${path.join(p.mnt, 'train', n)}`));
    const sums = new Set((await Promise.all(readers)).map((r) => r.stdout.split(' ')[0]));
    t.equal(sums.size, 1, `${n}: every reader saw the same bytes`);
    const want = n === 'a.bin' ? sample : fs.readFileSync(path.join(origin, 'train', n));
    t.ok(fs.readFileSync(path.join(p.storage, 'train', n)).equals(want), `${n}: the origin's bytes in storage`);
    t.equal(logLines(p.log, new RegExp(`copied train/${n.replace('.', '\\.')} `)).length, 1, `${n}: one copy`);
  }
});

t.test('what the origin lacks is still waited for; a producer shadows the origin', async (t) => {
  const base = tmpdir(t);
  const { origin } = dataset(base);
  const c = await cluster(t, 2, ['--origin', origin, '--wait-timeout', '1']);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  const r = await sh(`cat ${path.join(q.mnt, 'train', 'missing.bin')}`, { timeoutMs: 30_000 });
  t.not(r.code, 0);
  t.match(r.stderr, /timed out/i, 'ETIMEDOUT, as without an origin');
  const probe = await sh(`stat ${path.join(q.mnt, 'train', 'missing.bin')}`);
  t.match(probe.stderr, /No such file/, 'stat: ENOENT at once');

  // Consumer first: the name is in neither place when it starts waiting.
  const cons = sh(`cat ${path.join(q.mnt, 'train', 'made.txt')}`, { timeoutMs: 30_000 });
  await new Promise((res) => setTimeout(res, 300));
  fs.writeFileSync(path.join(p.mnt, 'train', 'made.txt'), 'produced\n');
  const got = await cons;
  t.equal(got.stdout, 'produced\n', 'producer → consumer works beside the origin');

  // Writing a name the origin has makes a local file, published like any other.
  fs.writeFileSync(path.join(p.mnt, 'train', 'b.txt'), 'overwritten here\n');
  t.equal(fs.readFileSync(path.join(p.mnt, 'train', 'b.txt'), 'utf8'), 'overwritten here\n');
  t.equal(fs.readFileSync(path.join(q.mnt, 'train', 'b.txt'), 'utf8'), 'overwritten here\n', 'the other node gets the published version');
  t.equal(fs.readFileSync(path.join(origin, 'train', 'b.txt'), 'utf8'), 'bee\n', 'the origin is never written');
});

t.test('an owner that is gone: the reader copies from the origin and takes over', async (t) => {
  const base = tmpdir(t);
  const { origin, sample } = dataset(base);
  const c = await cluster(t, 3, ['--origin', origin, '--peer-timeout', '2', '--push-max', '0', '--log-level', 'debug']);
  const [, p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0], (typeof c.nodes)[0]];
  t.ok(fs.readFileSync(path.join(p.mnt, 'train', 'a.bin')).equals(sample), 'node 1 copied and published it');
  process.kill(p.pid, 'SIGKILL');
  await new Promise((res) => setTimeout(res, 200));
  const r = await sh(`md5sum < ${path.join(q.mnt, 'train', 'a.bin')}`, { timeoutMs: 60_000 });
  t.equal(r.code, 0, r.stderr);
  t.ok(fs.readFileSync(path.join(q.storage, 'train', 'a.bin')).equals(sample), 'node 2 has the bytes');
  t.match(fs.readFileSync(q.log, 'utf8'), /pull of train\/a\.bin from rank 1 .*failed/, 'the pull from the dead owner failed');
  t.equal(logLines(q.log, /copied train\/a\.bin .* from the origin/).length, 1, 'then it came from the origin');
});

t.test('a copy that does not fit fails the open with ENOSPC and leaves nothing behind', async (t) => {
  const base = tmpdir(t);
  const { origin } = dataset(base);
  const storage = path.join(base, 'small');
  if (!smallTmpfs(t, storage)) return;
  const mnt = path.join(base, 'mnt');
  fs.mkdirSync(mnt);
  const m = await mountCli(t, mnt, ['--storage', storage, '--origin', origin]);
  const r = await sh(`cat ${path.join(mnt, 'train', 'a.bin')} > /dev/null`);
  t.not(r.code, 0);
  t.match(r.stderr, /No space left on device/, 'ENOSPC');
  t.same(fs.readdirSync(path.join(storage, 'train')).filter((n) => n !== 'sub'), [], 'no partial or temporary file');
  t.match(fs.readFileSync(m.log, 'utf8'), /train\/a\.bin: copy from the origin: no space left/, 'the log names the file');
  t.equal(fs.readFileSync(path.join(mnt, 'train', 'b.txt'), 'utf8'), 'bee\n', 'a file that fits still comes through');
});

t.test('a bad origin stops the start with one line', async (t) => {
  const dir = tmpdir(t);
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  fs.writeFileSync(path.join(dir, 'file'), '');
  const cases: Array<[string, string[], RegExp]> = [
    ['missing', ['--origin', path.join(dir, 'nope')], /--origin .*nope: does not exist \(ENOENT\)$/],
    ['a file', ['--origin', path.join(dir, 'file')], /--origin .*file: not a directory \(ENOTDIR\)$/],
    ['the mountpoint itself', ['--origin', mnt], /must be outside the mountpoint and the storage/],
  ];
  for (const [what, args, re] of cases) {
    const r = await sh(`${process.execPath} ${dyadMountBin} --kvs-data ${path.join(dir, 'kvs')} ${args.join(' ')} ${mnt}`);
    t.not(r.code, 0, what);
    t.match(r.stderr.trim(), re, what);
    t.equal(r.stderr.trim().split('\n').length, 1, `${what}: one line`);
    t.notOk(isMountedAt(mnt));
  }
  const env = await new Promise<{ code: number | null; err: string }>((resolve) => {
    const child = spawn(process.execPath, [dyadMountBin, '--kvs-data', path.join(dir, 'kvs'), mnt], { env: { ...process.env, DYAD_PATH_ORIGIN: path.join(dir, 'nope') } });
    let err = '';
    child.stderr.on('data', (d: Buffer) => (err += d));
    child.on('close', (code) => resolve({ code, err }));
  });
  t.not(env.code, 0);
  t.match(env.err, /DYAD_PATH_ORIGIN .*nope: does not exist/, 'the variable is named');
});
