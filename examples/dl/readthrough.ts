/**
 * Deep-learning training over a dataset on shared storage, with dyad-fs's
 * read-through (`dyad-mount --origin`): the mission's "a sample found
 * nowhere is read from the origin and published for the others".
 *
 *   node dist/examples/dl/readthrough.js [SAMPLES]
 *
 * A dataset of SAMPLES files of 64 KiB is written to a directory standing in
 * for the parallel file system. Two nodes mount their DMD with that
 * directory as origin and run an unmodified training reader (examples/c/
 * train.c) for two epochs, both nodes at once. In epoch 0 each node reads
 * its own shard: every sample is copied from the origin exactly once, by the
 * node that read it, and published. In epoch 1 the shards rotate: each node
 * reads the other's samples, which it pulls from the other node; the origin
 * is not read again. A third epoch reads the local copies.
 *
 * Exits 0 only if every sample read was valid and the counts above hold (the
 * daemons' debug logs say where each sample came from).
 */
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { Teardown, buildProgram, indent, makeWorkDir, secs, startCluster } from '../lib/cluster.js';

const SAMPLE_BYTES = 65536;
const samples = Number(process.argv[2] ?? 64);

function sampleBytes(i: number): Buffer {
  const b = Buffer.allocUnsafe(SAMPLE_BYTES);
  for (let j = 0; j < SAMPLE_BYTES; j++) b[j] = (i * 31 + j * 7) & 0xff;
  return b;
}

function run(prog: string, args: string[]): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    const child = spawn(prog, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d));
    child.stderr.on('data', (d: Buffer) => (err += d));
    child.on('close', (code) => resolve({ code, out, err }));
  });
}

/** How many lines of a daemon's log match `re`. */
function count(log: string, re: RegExp): number {
  return fs.readFileSync(log, 'utf8').split('\n').filter((l) => re.test(l)).length;
}

async function main(): Promise<boolean> {
  if (!Number.isInteger(samples) || samples < 2 || samples % 2 !== 0) {
    process.stderr.write('SAMPLES must be an even number >= 2\n');
    return false;
  }
  const td = new Teardown();
  const failures: string[] = [];
  const check = (ok: boolean, what: string) => {
    process.stdout.write(`    ${ok ? 'ok  ' : 'FAIL'}  ${what}\n`);
    if (!ok) failures.push(what);
  };
  try {
    const root = makeWorkDir(td, 'dyad-dl-');
    const train = await buildProgram(path.join(root, 'bin'), 'train');
    const pfs = path.join(root, 'pfs', 'dataset');
    fs.mkdirSync(path.join(pfs, 'train'), { recursive: true });
    for (let i = 0; i < samples; i++) fs.writeFileSync(path.join(pfs, 'train', `sample_${String(i).padStart(5, '0')}.bin`), sampleBytes(i));
    process.stdout.write(`dataset: ${samples} samples of 64 KiB in ${pfs} (the "parallel file system")\n`);

    const cluster = await startCluster(td, root, 'dyad', ['--origin', pfs, '--log-level', 'debug']);
    for (const n of cluster.nodes) process.stdout.write(`node ${n.rank}: ${n.command.join(' ')}\n`);
    const listed = fs.readdirSync(path.join(cluster.nodes[1]!.dmd, 'train')).length;
    check(listed === samples, `node 1 lists ${listed} samples through its mount before reading any`);

    const logs = cluster.nodes.map((n) => n.log);
    const copies = () => logs.reduce((s, l) => s + count(l, /copied train\/sample_\d+\.bin .* from the origin/), 0);
    const pulls = () => logs.reduce((s, l) => s + count(l, /pulled train\/sample_\d+\.bin/), 0);
    for (let epoch = 0; epoch < 3; epoch++) {
      const t0 = performance.now();
      const results = await Promise.all(cluster.nodes.map((n) => run(train, [String(samples), path.join(n.dmd, 'train'), String(n.rank), '2', String(epoch)])));
      process.stdout.write(`epoch ${epoch} (${secs(performance.now() - t0)}):\n`);
      for (const r of results) process.stdout.write(indent(`${r.out.trimEnd()}${r.err ? `\n${r.err.trimEnd()}` : ''}`, '    | ') + '\n');
      check(results.every((r) => r.code === 0), `epoch ${epoch}: every sample valid on both nodes`);
      const c = copies();
      const p = pulls();
      process.stdout.write(`    from the origin so far: ${c}; pulled from the other node so far: ${p}\n`);
      if (epoch === 0) check(c === samples && p === 0, `epoch 0: each sample copied from the origin once, by the node reading it (${c} of ${samples})`);
      if (epoch === 1) check(c === samples && p === samples, `epoch 1: every sample pulled from the node that had it (${p} of ${samples}); the origin not read again`);
      if (epoch === 2) check(c === samples && p === samples, 'epoch 2: local copies only, nothing moved');
    }
  } catch (err) {
    failures.push(`error: ${(err as Error).message}`);
    process.stdout.write(`\nerror: ${(err as Error).stack ?? String(err)}\n`);
  } finally {
    td.run();
    for (const p of td.problems) failures.push(`cleanup: ${p}`);
  }
  process.stdout.write(failures.length ? `read-through example FAILED: ${failures.join('; ')}\n` : 'read-through example passed\n');
  return failures.length === 0;
}

process.exitCode = (await main()) ? 0 : 1;
