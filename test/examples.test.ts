/**
 * The tutorial as `npm run demo` runs it: unmodified C producer and consumer
 * on two nodes, consumer first, then the batch workflow in random order; and
 * the deep-learning read-through example (examples/dl).
 */
import t from 'tap';
import path from 'node:path';
import { repoRoot, sh } from './helpers/mount.js';

t.test('the deep-learning read-through example passes', async (t) => {
  const r = await sh(`${process.execPath} ${path.join(repoRoot, 'dist', 'examples', 'dl', 'readthrough.js')} 32`, { timeoutMs: 120_000 });
  if (r.code !== 0) t.comment(r.stdout.slice(-2000) + r.stderr.slice(-1000));
  t.equal(r.code, 0, 'exits 0');
  t.match(r.stdout, /epoch 0: each sample copied from the origin once/);
  t.match(r.stdout, /epoch 1: every sample pulled from the node that had it \(32 of 32\)/);
  t.match(r.stdout, /read-through example passed/);
});

t.test('npm run demo passes', async (t) => {
  const r = await sh(`${process.execPath} ${path.join(repoRoot, 'dist', 'examples', 'demo.js')}`, { timeoutMs: 180_000 });
  t.equal(r.code, 0, r.stderr.slice(-2000));
  t.match(r.stdout, /File 9 validation: OK/, 'the consumer validated every file');
  t.match(r.stdout, /the consumer blocks until the producer runs/);
  t.match(r.stdout, /all \d+ jobs finished and validated/);
  t.match(r.stdout, /demo passed/);
});
