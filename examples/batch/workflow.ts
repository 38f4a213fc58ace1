/**
 * The tutorial's batch workflow (docs/demos/SCA26/batch/workflow.sh) on
 * dyad-fs: N consumer jobs and N producer jobs, each pair sharing the
 * subdirectory <DMD>/<i>, all launched at once in random order with no
 * dependency between them. The point is that a consumer may be scheduled
 * before its producer and simply waits in open(), so a scheduler needs no
 * job dependencies and the data stays on node-local storage.
 *
 *   node dist/examples/batch/workflow.js [N]
 *
 * Standalone, it builds the C programs, starts two nodes, runs the workflow
 * twice (all producers on node 0, then half the pairs reversed) and tears
 * everything down. examples/demo.ts calls runBatchWorkflow on its own nodes.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  Teardown,
  buildPrograms,
  checkConsumer,
  finish,
  makeWorkDir,
  secs,
  sleep,
  startCluster,
  startJob,
  type Cluster,
  type Job,
  type Programs,
} from '../lib/cluster.js';

export interface BatchOptions {
  cluster: Cluster;
  programs: Programs;
  td: Teardown;
  /** Producer/consumer pairs. */
  pairs: number;
  /** Files per pair (the tutorial's 10). */
  files?: number;
  /** Reverse every other pair: producer on node 1, consumer on node 0. */
  crossed?: boolean;
  /** Number of the first pair's subdirectory, so that runs on the same nodes do not share names. */
  firstPair?: number;
  /** Longest a job may run before it is killed and counted as failed. */
  timeoutMs?: number;
  say?: (line: string) => void;
}

export interface BatchJob {
  name: string;
  kind: 'prod' | 'cons';
  pair: number;
  rank: number;
  dir: string;
  launch: number;
  /** From the workflow's start. */
  startMs: number;
  durationMs: number;
  ok: boolean;
  verdict: string;
  stderr: string;
}

export interface BatchResult {
  ok: boolean;
  wallMs: number;
  jobs: BatchJob[];
}

function shuffle<T>(a: T[]): T[] {
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [a[i], a[j]] = [a[j]!, a[i]!];
  }
  return a;
}

interface Spec {
  name: string;
  kind: 'prod' | 'cons';
  pair: number;
  rank: number;
  dir: string;
}

export async function runBatchWorkflow(o: BatchOptions): Promise<BatchResult> {
  const files = o.files ?? 10;
  const first = o.firstPair ?? 0;
  const say = o.say ?? ((l: string) => process.stdout.write(`${l}\n`));
  const timeoutMs = o.timeoutMs ?? 20_000;
  const [n0, n1] = o.cluster.nodes as [Cluster['nodes'][0], Cluster['nodes'][0]];

  const specs: Spec[] = [];
  for (let k = 0; k < o.pairs; k++) {
    const pair = first + k;
    const reversed = !!o.crossed && k % 2 === 1;
    const [prodNode, consNode] = reversed ? [n1, n0] : [n0, n1];
    specs.push({ name: `cons-${pair}`, kind: 'cons', pair, rank: consNode.rank, dir: path.join(consNode.dmd, String(pair)) });
    specs.push({ name: `prod-${pair}`, kind: 'prod', pair, rank: prodNode.rank, dir: path.join(prodNode.dmd, String(pair)) });
  }
  shuffle(specs);
  say(`    submission order: ${specs.map((s) => `${s.name}@node${s.rank}`).join(' ')}`);

  // Like a batch scheduler starting jobs as it gets to them: in the shuffled
  // order, up to a quarter of a second apart, nobody waiting for anybody.
  const t0 = performance.now();
  const running: { spec: Spec; job: Job; launch: number }[] = [];
  for (const [i, spec] of specs.entries()) {
    const prog = spec.kind === 'prod' ? o.programs.prod : o.programs.cons;
    running.push({ spec, job: startJob(o.td, spec.name, prog, files, spec.dir), launch: i + 1 });
    await sleep(Math.floor(Math.random() * 250));
  }
  const results = await Promise.all(running.map((r) => finish(r.job, timeoutMs)));
  const wallMs = performance.now() - t0;

  const jobs: BatchJob[] = running.map(({ spec, launch }, i) => {
    const r = results[i]!;
    const { ok, verdict } =
      spec.kind === 'cons'
        ? checkConsumer(r, files)
        : { ok: r.code === 0, verdict: r.signal ? `killed by ${r.signal}` : `${files} files written, exit ${r.code}` };
    return {
      name: spec.name,
      kind: spec.kind,
      pair: spec.pair,
      rank: spec.rank,
      dir: spec.dir,
      launch,
      startMs: r.startMs - t0,
      durationMs: r.endMs - r.startMs,
      ok,
      verdict,
      stderr: r.stderr.trim(),
    };
  });

  const byName = new Map(jobs.map((j) => [j.name, j]));
  say('    job       node  dir            launched  started  duration  result');
  for (const j of jobs) {
    const rel = path.relative(o.cluster.root, j.dir);
    let note = '';
    if (j.kind === 'cons') {
      const p = byName.get(`prod-${j.pair}`)!;
      note = p.launch > j.launch ? '  (started before its producer: waited)' : '';
    }
    say(
      `    ${j.name.padEnd(9)} ${String(j.rank).padStart(4)}  ${rel.padEnd(14)} ${String(j.launch).padStart(8)}  ${`+${(j.startMs / 1000).toFixed(2)}s`.padStart(7)}  ${secs(j.durationMs).padStart(8)}  ${j.ok ? '' : 'FAILED: '}${j.verdict}${note}`,
    );
    if (!j.ok && j.stderr) for (const l of j.stderr.split('\n').slice(0, 5)) say(`              ${l}`);
  }
  const ok = jobs.every((j) => j.ok);
  say(`    ${ok ? 'all' : 'NOT all'} ${jobs.length} jobs finished and validated; wall time ${secs(wallMs)}`);
  return { ok, wallMs, jobs };
}

/** The tutorial's cleanup between runs: remove the pairs' directories on every node. */
export function removePairDirs(cluster: Cluster, pairs: number[]): void {
  for (const node of cluster.nodes) for (const p of pairs) fs.rmSync(path.join(node.dmd, String(p)), { recursive: true, force: true });
}

async function main(): Promise<number> {
  const arg = process.argv[2];
  const pairs = arg === undefined ? 4 : Number(arg);
  if (!Number.isInteger(pairs) || pairs < 1 || pairs > 64) {
    process.stderr.write('usage: node dist/examples/batch/workflow.js [N]   (N pairs, 1..64, default 4)\n');
    return 2;
  }
  const td = new Teardown();
  try {
    const root = makeWorkDir(td, 'dyad-batch-');
    const programs = await buildPrograms(path.join(root, 'bin'));
    const cluster = await startCluster(td, root);
    process.stdout.write(`two nodes up: ${cluster.nodes.map((n) => `node ${n.rank} on ${n.dmd}`).join(', ')}; KVS ${cluster.kvsUrl}\n`);
    process.stdout.write(`\nrun 1: ${pairs} pairs, every producer on node 0, every consumer on node 1\n`);
    const a = await runBatchWorkflow({ cluster, programs, td, pairs });
    process.stdout.write(`\nrun 2: ${pairs} more pairs, every other pair reversed (producer on node 1, consumer on node 0)\n`);
    const b = await runBatchWorkflow({ cluster, programs, td, pairs, crossed: true, firstPair: pairs });
    return a.ok && b.ok ? 0 : 1;
  } catch (err) {
    process.stderr.write(`workflow: ${(err as Error).message}\n`);
    return 1;
  } finally {
    td.run();
    if (td.problems.length) process.exitCode = 1;
  }
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().then((code) => {
    process.exitCode = process.exitCode || code;
  });
}
