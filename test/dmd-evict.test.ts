/**
 * DYAD_CACHE_* on a mount: copies pulled from other nodes beyond the
 * capacity are evicted, least recently opened first, never while open, and
 * come back by a pull or from the origin; files written on a node are never
 * evicted, nor is a copy whose origin file changed. Two nodes,
 * plain tools.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { spawn } from 'node:child_process';
import { cluster, mountCli, pulls, sh, sleep, tmpdir, waitExit } from './helpers/mount.js';
import { openKvs } from '../src/kvs/index.js';

const SIZE = 100_000;
const content = (i: number) => Buffer.alloc(SIZE, `file ${i} `);
const md5 = (b: Buffer) => createHash('md5').update(b).digest('hex');

t.test('copies beyond the capacity are evicted least recently opened first, never while open, and pulled again when opened', async (t) => {
  // Node 1 keeps 3 copies at most (300,000 B), and evicts down to 2 (0.7).
  // Node 0, the owner, is given a capacity it is far beyond: its own files stay.
  const cacheArgs = ['--cache-grace-period', '0', '--cache-low-watermark', '0.7', '--log-level', 'debug'];
  const c = await cluster(t, 2, cacheArgs, (rank) => ['--cache-capacity', rank === 0 ? '1' : String(3 * SIZE)]);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  for (let i = 1; i <= 5; i++) fs.writeFileSync(path.join(p.mnt, `f${i}`), content(i));
  const read = async (i: number) => {
    const r = await sh(`timeout 20 md5sum < ${path.join(q.mnt, `f${i}`)}`, { timeoutMs: 30_000 });
    t.equal(r.stdout.split(' ')[0], md5(content(i)), `f${i} reads whole on node 1 (${r.stderr})`);
  };
  const kept = () =>
    fs
      .readdirSync(q.storage)
      .filter((n) => /^f\d$/.test(n))
      .sort();

  for (let i = 1; i <= 5; i++) await read(i);
  // f4 passed the capacity: f1 and f2 went, down to 200,000 B; f5 fits.
  t.same(kept(), ['f3', 'f4', 'f5'], 'the first two copies were evicted when the fourth landed');
  t.match(fs.readFileSync(q.log, 'utf8'), /evicted 2 copies \(200000 B\); copies kept: 200000 B/, 'the log says so');
  t.same(fs.readdirSync(p.storage).sort(), ['f1', 'f2', 'f3', 'f4', 'f5'], "the owner's files stay, whatever its capacity");
  t.equal(fs.statSync(path.join(q.mnt, 'f1')).size, SIZE, 'an evicted copy still shows, from its record');

  // Least recently opened, not first landed: f3 is read again, then f1
  // comes back, and f4 and f5 go.
  await read(3);
  const before = pulls(q.log);
  await read(1);
  t.equal(pulls(q.log), before + 1, 'an evicted copy is pulled again at its next open');
  t.same(kept(), ['f1', 'f3'], 'the copies opened longest ago went');

  // A copy open in a program stays, though it was opened longest ago.
  const holder = spawn('python3', ['-c', 'import sys, time\nf = open(sys.argv[1], "rb")\nprint("open", flush=True)\ntime.sleep(600)', path.join(q.mnt, 'f3')], { stdio: ['ignore', 'pipe', 'inherit'] });
  t.teardown(() => holder.kill('SIGKILL'));
  await new Promise((resolve) => holder.stdout!.once('data', resolve));
  await read(1);
  await read(4);
  await read(5);
  t.same(kept(), ['f3', 'f5'], 'the open copy stayed; the next least recent ones went');
  holder.kill('SIGKILL');
  // What node 1 evicted is whole again from node 0 at any time.
  for (const i of [1, 2, 4]) await read(i);
});

t.test('a restarted node counts the copies in its storage, and evicts what exceeds its capacity', async (t) => {
  const c = await cluster(t, 2);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  for (let i = 1; i <= 4; i++) fs.writeFileSync(path.join(p.mnt, `f${i}`), content(i));
  for (let i = 1; i <= 4; i++) {
    const r = await sh(`timeout 20 cat ${path.join(q.mnt, `f${i}`)} > /dev/null`, { timeoutMs: 30_000 });
    t.equal(r.code, 0, r.stderr);
  }
  const copies = () => fs.readdirSync(q.storage).filter((n) => /^f\d$/.test(n)).length;
  t.equal(copies(), 4, 'without a capacity every copy stays');
  process.kill(q.pid, 'SIGKILL');
  await waitExit(q.pid);
  const again = await mountCli(t, q.mnt, ['--kvs', c.kvsUrl, '--secret-file', c.secretFile, '--rank', '1', '--storage', q.storage, '--cache-capacity', String(2.5 * SIZE), '--cache-low-watermark', '0.5', '--cache-grace-period', '0']);
  let evicted = '';
  for (let i = 0; i < 200 && !evicted; i++) {
    evicted = /evicted \d+ copies[^\n]*/.exec(fs.readFileSync(again.log, 'utf8'))?.[0] ?? '';
    if (!evicted) await sleep(50);
  }
  t.equal(evicted, 'evicted 3 copies (300000 B); copies kept: 100000 B', 'the scan counted the 4 copies, and evicted down to the low watermark');
  t.equal(copies(), 1, 'one copy is left in storage');
  for (let i = 1; i <= 4; i++) {
    const r = await sh(`timeout 20 md5sum < ${path.join(again.mnt, `f${i}`)}`, { timeoutMs: 30_000 });
    t.equal(r.stdout.split(' ')[0], md5(content(i)), `f${i} reads whole (${r.stderr})`);
  }
});

t.test("copies from the origin are evicted too, and their publication withdrawn; one written here is the node's own", async (t) => {
  const base = tmpdir(t);
  const origin = path.join(base, 'origin');
  fs.mkdirSync(origin);
  for (let i = 1; i <= 4; i++) fs.writeFileSync(path.join(origin, `s${i}`), content(i));
  // Node 0 keeps 2 copies, and evicts down to 1.
  const c = await cluster(t, 2, ['--origin', origin, '--log-level', 'debug'], (rank) => (rank === 0 ? ['--cache-capacity', String(2 * SIZE), '--cache-low-watermark', '0.5', '--cache-grace-period', '0'] : []));
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  const readOn = async (mnt: string, i: number) => {
    const r = await sh(`timeout 20 md5sum < ${path.join(mnt, `s${i}`)}`, { timeoutMs: 30_000 });
    t.equal(r.stdout.split(' ')[0], md5(content(i)), `s${i} reads whole (${r.stderr})`);
  };
  const kept = () =>
    fs
      .readdirSync(p.storage)
      .filter((n) => /^s\d$/.test(n))
      .sort();
  await readOn(p.mnt, 1);
  // Written here: this node's own from now on, whatever the capacity.
  fs.appendFileSync(path.join(p.mnt, 's1'), 'and more');
  t.equal(fs.readFileSync(path.join(q.mnt, 's1'), 'utf8'), content(1).toString() + 'and more', 'the rewritten copy is published as it is now');
  for (const i of [2, 3]) await readOn(p.mnt, i);
  // The dataset changes under s2: node 0's copy of the old one may be the last.
  fs.writeFileSync(path.join(origin, 's2'), content(9));
  await readOn(p.mnt, 4);
  t.same(kept(), ['s1', 's2', 's4'], 'origin copies beyond the capacity went; the one written here stayed, and so did one whose origin file changed');
  const kvs = await openKvs(c.kvsUrl, { secret: fs.readFileSync(c.secretFile, 'utf8').trim(), env: {} });
  t.teardown(() => kvs.close());
  // Withdrawn in the background, moments after the eviction.
  let rec = await kvs.lookup('dyad', 's3');
  for (let i = 0; i < 100 && rec; i++) {
    await sleep(50);
    rec = await kvs.lookup('dyad', 's3');
  }
  t.equal(rec, undefined, "an evicted origin copy's publication is withdrawn");
  t.equal((await kvs.lookup('dyad', 's4'))?.owner, 0, 'a kept one stays published by its node');
  // Node 0 no longer offers s3: node 1 copies it from the origin itself.
  await readOn(q.mnt, 3);
  t.equal((await kvs.lookup('dyad', 's3'))?.owner, 1, 'the next reader took it from the origin, and published it');
  // And node 0 reads s3 again: from node 1 now, whole.
  await readOn(p.mnt, 3);
});

t.test('a restarted node knows the origin copies in its storage by their mark, and evicts them like the others', async (t) => {
  const base = tmpdir(t);
  const origin = path.join(base, 'origin');
  fs.mkdirSync(origin);
  for (let i = 1; i <= 3; i++) fs.writeFileSync(path.join(origin, `s${i}`), content(i));
  const c = await cluster(t, 2, ['--origin', origin]);
  const q = c.nodes[1]!;
  for (let i = 1; i <= 3; i++) {
    const r = await sh(`timeout 20 cat ${path.join(q.mnt, `s${i}`)} > /dev/null`, { timeoutMs: 30_000 });
    t.equal(r.code, 0, r.stderr);
  }
  process.kill(q.pid, 'SIGKILL');
  await waitExit(q.pid);
  const again = await mountCli(t, q.mnt, ['--kvs', c.kvsUrl, '--secret-file', c.secretFile, '--rank', '1', '--storage', q.storage, '--origin', origin, '--cache-capacity', String(1.5 * SIZE), '--cache-low-watermark', '0.7', '--cache-grace-period', '0']);
  let evicted = '';
  for (let i = 0; i < 200 && !evicted; i++) {
    evicted = /evicted \d+ copies[^\n]*/.exec(fs.readFileSync(again.log, 'utf8'))?.[0] ?? '';
    if (!evicted) await sleep(50);
  }
  t.equal(evicted, 'evicted 2 copies (200000 B); copies kept: 100000 B', 'the scan counted the 3 origin copies, and evicted down to the low watermark');
  t.equal(fs.readdirSync(q.storage).filter((n) => /^s\d$/.test(n)).length, 1, 'one is left in storage');
  for (let i = 1; i <= 3; i++) {
    const r = await sh(`timeout 20 md5sum < ${path.join(c.nodes[0]!.mnt, `s${i}`)}`, { timeoutMs: 30_000 });
    t.equal(r.stdout.split(' ')[0], md5(content(i)), `s${i} reads whole on the other node (${r.stderr})`);
  }
});

t.test('two nodes reading the same origin samples at once, each evicting, all get every byte', async (t) => {
  // A small deep-learning run: node 0 reads the samples in order while node 1
  // reads them from the other end, for three epochs, each node keeping a
  // quarter of the dataset. Pulls then often meet a copy just evicted (and
  // its record withdrawn) on the other node.
  const base = tmpdir(t);
  const origin = path.join(base, 'origin');
  fs.mkdirSync(origin);
  const n = 64;
  const sample = (i: number) => Buffer.alloc(64 << 10, `sample ${i} `);
  for (let i = 0; i < n; i++) fs.writeFileSync(path.join(origin, `x${i}`), sample(i));
  const c = await cluster(t, 2, ['--origin', origin, '--cache-capacity', String(16 * (64 << 10)), '--cache-grace-period', '0']);
  const order = [Array.from({ length: n }, (_, i) => i), Array.from({ length: n }, (_, i) => n - 1 - i)];
  for (let epoch = 0; epoch < 3; epoch++) {
    const runs = c.nodes.map((node, r) => {
      const files = order[r]!.map((i) => path.join(node.mnt, `x${i}`)).join(' ');
      return sh(`timeout 60 sh -c 'for f in ${files}; do cat "$f"; done' | md5sum`, { timeoutMs: 90_000 });
    });
    const sums = await Promise.all(runs);
    for (const [r, s] of sums.entries()) {
      t.equal(s.stdout.split(' ')[0], md5(Buffer.concat(order[r]!.map(sample))), `epoch ${epoch}, node ${r}: every sample whole (${s.stderr})`);
    }
  }
  for (const node of c.nodes) t.ok(fs.readdirSync(node.storage).filter((f) => f.startsWith('x')).length <= 16, 'each node kept at most its capacity');
});
