/**
 * npm run bench -- dl: deep-learning epochs over a dataset behind
 * `dyad-mount --origin`, beside the same reads straight from the origin.
 *
 * Two nodes (daemons on this machine, node 0 serving the embedded KVS) run
 * the unmodified reader examples/c/train.c at the same time, one process
 * each, for three epochs. Epoch e has rank r read shard (r + e) % 2, so:
 *   epoch 0: every sample is copied from the origin once and published;
 *   epoch 1: every sample is pulled from the other node;
 *   epoch 2: every sample is read from local storage.
 * The baseline is the same two readers reading the origin directly, every
 * epoch. The figure that matters on a cluster is the last column: how many
 * bytes each way takes from the shared file system.
 *
 *   npm run bench -- dl [--samples 512] [--origin DIR] [--cache-capacity BYTES]
 *
 * --cache-capacity gives each daemon that eviction budget (DYAD_CACHE_*,
 * grace period 0): the dataset no longer has to fit in the nodes' storage,
 * and the table shows what that costs in time and in bytes read again from
 * the origin, beside the largest storage a node used.
 *
 * Samples are 64 KiB (the reader checks every byte of each).
 *
 * --origin puts the dataset in DIR (for example on a real parallel file
 * system); by default it goes under $TMPDIR, as the nodes' storage does, so
 * on this machine the "shared" file system is as fast as local storage and
 * only the overhead of copying, publishing and pulling shows.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync, spawn } from 'node:child_process';
import { parseArgs } from 'node:util';
import { printTable, repoRoot, run, type Row } from './lib.js';

const mountBin = path.join(repoRoot, 'bin', 'dyad-mount.js');
const dyadBin = path.join(repoRoot, 'bin', 'dyad.js');

function reader(prog: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const c = spawn(prog, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    c.stderr.on('data', (d: Buffer) => (err += d));
    c.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`${prog} ${args.join(' ')}: exit ${code}: ${err}`))));
  });
}

/** Both readers at once, as two training ranks; seconds. */
async function epoch(prog: string, dirs: [string, string], samples: number, e: number): Promise<number> {
  const t0 = process.hrtime.bigint();
  await Promise.all(dirs.map((d, rank) => reader(prog, [String(samples), d, String(rank), '2', String(e)])));
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

export async function main(args: string[]): Promise<void> {
  const { values } = parseArgs({ args, options: { samples: { type: 'string', default: '512' }, origin: { type: 'string' }, 'cache-capacity': { type: 'string' } } });
  const capacity = values['cache-capacity'];
  const capped = capacity !== undefined;
  const cacheArgs = capped ? ['--cache-capacity', capacity, '--cache-grace-period', '0'] : [];
  const samples = Number(values.samples);
  if (!Number.isInteger(samples) || samples < 2 || samples % 2) throw new Error('--samples must be an even number >= 2');
  const size = 64 << 10;
  const base = fs.mkdtempSync(path.join(os.tmpdir(), 'dyad-bench-dl-'));
  const origin = values.origin ? fs.mkdtempSync(path.join(path.resolve(values.origin), 'dyad-bench-dl-origin-')) : path.join(base, 'origin');
  const train = path.join(base, 'train');
  execFileSync('cc', ['-std=c11', '-O2', '-o', train, path.join(repoRoot, 'examples', 'c', 'train.c')]);
  fs.mkdirSync(path.join(origin, 'train'), { recursive: true });
  const buf = Buffer.allocUnsafe(size);
  for (let i = 0; i < samples; i++) {
    for (let j = 0; j < size; j++) buf[j] = (i * 31 + j * 7) & 0xff;
    fs.writeFileSync(path.join(origin, 'train', `sample_${String(i).padStart(5, '0')}.bin`), buf);
  }
  const mnts: string[] = [];
  try {
    // Baseline: straight from the origin, every epoch.
    const direct: number[] = [];
    for (let e = 0; e < 3; e++) direct.push(await epoch(train, [path.join(origin, 'train'), path.join(origin, 'train')], samples, e));

    const kvsData = path.join(base, 'kvs');
    for (const rank of [0, 1]) {
      const mnt = path.join(base, `n${rank}`);
      const storage = path.join(base, `s${rank}`);
      fs.mkdirSync(mnt);
      fs.mkdirSync(storage);
      const kvs = rank === 0 ? ['--kvs-serve', '127.0.0.1:0', '--kvs-data', kvsData] : ['--kvs', kvsUrl(path.join(base, 'n0.log')), '--secret-file', path.join(kvsData, 'secrets', 'dyad.secret')];
      run(process.execPath, [mountBin, '--background', '--log', `${mnt}.log`, '--log-level', 'debug', '--storage', storage, '--rank', String(rank), '--origin', origin, ...kvs, ...cacheArgs, mnt]);
      mnts.push(mnt);
    }
    const through: number[] = [];
    for (let e = 0; e < 3; e++) through.push(await epoch(train, [path.join(mnts[0]!, 'train'), path.join(mnts[1]!, 'train')], samples, e));

    const mib = (samples * size) / 2 ** 20;
    // What the daemons say they copied from the origin (debug log lines).
    let copied = 0;
    for (const m of mnts) {
      for (const l of fs.readFileSync(`${m}.log`, 'utf8').split('\n')) {
        const c = /copied \S+ \((\d+) B\) from the origin/.exec(l);
        if (c) copied += Number(c[1]);
      }
    }
    // The most a node's storage held at the end: what it had to have room for.
    const stored = Math.max(...[0, 1].map((r) => storageBytes(path.join(base, `s${r}`))));
    console.log(`# ${samples} samples of 64 KiB (${mib.toFixed(0)} MiB), 2 nodes, origin ${origin}${capped ? `, --cache-capacity ${capacity} per node` : ''}`);
    const rows: Row[] = [
      { what: `epoch 0 (dyad-fs: each sample copied from the origin once, published)`, value: through[0]!, unit: 's', baseline: { name: 'read from the origin', value: direct[0]! }, better: 'lower' },
      { what: `epoch 1 (dyad-fs: each sample pulled from the other node${capped ? ', or copied again where it was evicted' : ''})`, value: through[1]!, unit: 's', baseline: { name: 'read from the origin', value: direct[1]! }, better: 'lower' },
      { what: `epoch 2 (dyad-fs: local copies${capped ? ' where kept' : ''})`, value: through[2]!, unit: 's', baseline: { name: 'read from the origin', value: direct[2]! }, better: 'lower' },
      { what: 'bytes read from the origin over 3 epochs', value: copied / 2 ** 20, unit: 'MiB', baseline: { name: 'read from the origin (the dataset each epoch)', value: 3 * mib }, better: 'lower' },
      { what: 'largest node storage after 3 epochs', value: stored / 2 ** 20, unit: 'MiB', baseline: { name: 'the dataset', value: mib }, better: 'lower' },
    ];
    printTable(`Deep-learning epochs through --origin${capped ? `, --cache-capacity ${capacity}` : ''}`, rows);
  } finally {
    for (const m of mnts.reverse()) {
      try {
        execFileSync(process.execPath, [dyadBin, 'umount', m], { stdio: 'ignore' });
      } catch {
        execFileSync('umount', ['-l', m], { stdio: 'ignore' });
      }
    }
    await new Promise((r) => setTimeout(r, 300));
    fs.rmSync(base, { recursive: true, force: true });
    if (values.origin) fs.rmSync(origin, { recursive: true, force: true });
  }
}

/** Bytes of regular files under a directory. */
function storageBytes(dir: string): number {
  let n = 0;
  for (const e of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile()) n += fs.statSync(path.join(e.parentPath ?? e.path, e.name)).size;
  }
  return n;
}

function kvsUrl(log: string): string {
  const m = /serving the embedded KVS at (dyad:\/\/\S+)/.exec(fs.readFileSync(log, 'utf8'));
  if (!m) throw new Error(`node 0 did not report its KVS URL in ${log}`);
  return m[1]!;
}
