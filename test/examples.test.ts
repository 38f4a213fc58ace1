/**
 * The tutorial as `npm run demo` runs it: unmodified C producer and consumer
 * on two nodes, consumer first, then the batch workflow in random order.
 */
import t from 'tap';
import path from 'node:path';
import { repoRoot, sh } from './helpers/mount.js';

t.test('npm run demo passes', async (t) => {
  const r = await sh(`${process.execPath} ${path.join(repoRoot, 'dist', 'examples', 'demo.js')}`, { timeoutMs: 180_000 });
  t.equal(r.code, 0, r.stderr.slice(-2000));
  t.match(r.stdout, /File 9 validation: OK/, 'the consumer validated every file');
  t.match(r.stdout, /the consumer blocks until the producer runs/);
  t.match(r.stdout, /all \d+ jobs finished and validated/);
  t.match(r.stdout, /demo passed/);
});
