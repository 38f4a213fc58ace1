/**
 * `npm run demo`: the DYAD SCA26 tutorial's two examples, end to end, on
 * dyad-fs with two "nodes" on this machine.
 *
 * 1. Interactive example: the consumer is started first on node 1 and
 *    blocks in open(); the producer then writes on node 0, and the consumer
 *    gets every file copied into node 1's storage and validates it.
 * 2. Batch workflow (examples/batch/workflow.ts): producer and consumer jobs
 *    launched in random order with no dependencies, then again with half the
 *    pairs going the other way.
 *
 * The C programs are built at run time; they are plain stdio programs run
 * without LD_PRELOAD. Exits 0 only if every check passed, and always tears
 * down its mounts, daemons and temporary directory.
 */
import fs from 'node:fs';
import path from 'node:path';
import {
  Teardown,
  buildPrograms,
  checkConsumer,
  dyad,
  finish,
  indent,
  lsl,
  makeWorkDir,
  secs,
  sleep,
  startCluster,
  startJob,
  wchan,
} from './lib/cluster.js';
import { removePairDirs, runBatchWorkflow } from './batch/workflow.js';

const FILES = 10;
const PAIRS = 4;

const t0 = performance.now();
function say(line = ''): void {
  process.stdout.write(line === '' ? '\n' : `[${((performance.now() - t0) / 1000).toFixed(2).padStart(5)}s] ${line}\n`);
}
function sub(line: string): void {
  process.stdout.write(`${line}\n`);
}

async function main(): Promise<boolean> {
  const td = new Teardown();
  const failures: string[] = [];
  const check = (ok: boolean, what: string) => {
    sub(`        ${ok ? 'ok  ' : 'FAIL'}  ${what}`);
    if (!ok) failures.push(what);
  };
  try {
    const root = makeWorkDir(td, 'dyad-demo-');
    sub(`dyad-fs demo: the DYAD tutorial's producer/consumer examples on two nodes of this machine`);
    sub(`work directory ${root}\n`);

    let t = performance.now();
    const programs = await buildPrograms(path.join(root, 'bin'));
    say(`built prod and cons from examples/c with cc (${secs(performance.now() - t)}) — the tutorial's \`make\``);

    // Tutorial: flux kvs namespace create dyad; flux exec -r all flux module load dyad.so DMD
    t = performance.now();
    const cluster = await startCluster(td, root);
    const [n0, n1] = cluster.nodes as [(typeof cluster.nodes)[0], (typeof cluster.nodes)[0]];
    say(`started the two nodes' daemons (${secs(performance.now() - t)}) — the tutorial's \`flux module load dyad.so\` on every rank`);
    for (const n of cluster.nodes) sub(`        node ${n.rank}: ${n.command.join(' ')}   (pid ${n.pid})`);
    sub(`        node 0 serves the KVS at ${cluster.kvsUrl}; node 1 uses it with namespace "${cluster.namespace}"'s secret`);
    const namespaces = (await dyad(['namespace', 'list', '--kvs', cluster.kvsUrl, '--data', cluster.kvsData])).trim().split('\n');
    say(`dyad namespace list → ${namespaces.join(', ')} — the tutorial's \`flux kvs namespace list\``);
    check(namespaces.includes(cluster.namespace), `namespace "${cluster.namespace}" exists`);

    // ---- interactive example ------------------------------------------------
    sub('');
    sub('== Interactive example: consumer first on node 1, then the producer on node 0');
    const consDir = path.join(n1.dmd, 'prod-cons');
    const prodDir = path.join(n0.dmd, 'prod-cons');
    say(`node 1: mkdir -p ${consDir}; cons ${FILES} ${consDir}   (c_cons.sh)`);
    const cons = startJob(td, 'cons', programs.cons, FILES, consDir);
    await sleep(1000);
    const blocked = cons.child.exitCode === null && cons.child.signalCode === null;
    const where = wchan(cons.child.pid);
    say(
      blocked
        ? `node 1: after ${secs(performance.now() - cons.startMs)} the consumer is still running, ${cons.stdout().split('\n').filter(Boolean).length} of ${FILES} files read${where ? `, blocked in the kernel at ${where} (waiting for the FUSE daemon)` : ''}`
        : `node 1: the consumer already ended after ${secs(performance.now() - cons.startMs)}`,
    );
    check(blocked && cons.stdout() === '', 'the consumer blocks until the producer runs');

    say(`node 0: mkdir -p ${prodDir}; prod ${FILES} ${prodDir}   (c_prod.sh)`);
    const prod = await finish(startJob(td, 'prod', programs.prod, FILES, prodDir), 15_000);
    say(`node 0: producer ended: exit ${prod.code ?? prod.signal}, ran ${secs(prod.endMs - prod.startMs)}`);
    if (prod.stderr) sub(indent(prod.stderr.trimEnd(), '        prod stderr: '));
    check(prod.code === 0, 'the producer exits 0');

    const c = await finish(cons, 15_000);
    say(`node 1: consumer ended: ran ${secs(c.endMs - c.startMs)} in all, ${secs(c.endMs - prod.endMs)} after the producer ended; its output:`);
    sub(indent(c.stdout.trimEnd() || '(none)', '        | '));
    if (c.stderr) sub(indent(c.stderr.trimEnd(), '        cons stderr: '));
    const verdict = checkConsumer(c, FILES);
    check(verdict.ok, `consumer: ${verdict.verdict} (want ${FILES}/${FILES} OK, exit 0)`);

    // Tutorial: flux exec -r 0 ls -l ...; flux exec -r 1 ls -l ...
    say(`ls -l on node 0 (producer's local storage): ${prodDir}`);
    sub(indent(lsl(prodDir), '        '));
    say(`ls -l on node 1 (consumer's local storage, files pulled from node 0): ${consDir}`);
    sub(indent(lsl(consDir), '        '));
    const same = Array.from({ length: FILES }, (_, k) => `data${k}.txt`).every((f) => {
      try {
        return fs.readFileSync(path.join(prodDir, f)).equals(fs.readFileSync(path.join(consDir, f)));
      } catch {
        return false;
      }
    });
    check(same, 'node 1 holds byte-identical copies of all files');

    // Tutorial: flux exec -r all rm -rf ${DYAD_PATH_PRODUCER}/prod-cons
    say('node 0 and node 1: rm -rf <DMD>/prod-cons   (the tutorial\'s clean-up before the next example)');
    for (const d of [consDir, prodDir]) fs.rmSync(d, { recursive: true, force: true });

    // ---- batch workflow -------------------------------------------------------
    sub('');
    sub(`== Batch workflow: ${PAIRS} consumer and ${PAIRS} producer jobs, random order, no dependencies`);
    say(`run 1: consumers on node 1, producers on node 0, pair i in <DMD>/i`);
    const a = await runBatchWorkflow({ cluster, programs, td, pairs: PAIRS, files: FILES, say: sub });
    check(a.ok, `batch run 1: all ${a.jobs.length} jobs validated`);
    say(`run 2: every other pair reversed (producer on node 1, consumer on node 0)`);
    const b = await runBatchWorkflow({ cluster, programs, td, pairs: PAIRS, files: FILES, crossed: true, firstPair: PAIRS, say: sub });
    check(b.ok, `batch run 2: all ${b.jobs.length} jobs validated`);
    removePairDirs(cluster, [...a.jobs, ...b.jobs].map((j) => j.pair));
  } catch (err) {
    failures.push(`error: ${(err as Error).message}`);
    sub(`\nerror: ${(err as Error).stack ?? String(err)}`);
  } finally {
    sub('');
    say('tearing down: dyad umount on each node (its daemon then exits), remove the work directory');
    td.run();
    for (const p of td.problems) failures.push(`cleanup: ${p}`);
  }
  sub('');
  if (failures.length) {
    sub(`demo FAILED (${failures.length}):`);
    for (const f of failures) sub(`  - ${f}`);
    return false;
  }
  say('demo passed: every check above is ok');
  return true;
}

main().then((ok) => {
  process.exitCode = ok ? 0 : 1;
});
