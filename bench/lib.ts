/** Small helpers shared by the benchmarks: timing, tables, child processes. */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import net from 'node:net';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

export function percentile(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
}

export function run(cmd: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', cwd: opts.cwd, env: opts.env });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout + r.stderr;
}

/** `cmd args` as run on a test host: behind the prefix that enters it (e.g. nsenter --net=...), if any. */
export function onHost(enter: string[], cmd: string, args: string[]): [string, string[]] {
  const [c, ...rest] = [...enter, cmd, ...args] as [string, ...string[]];
  return [c, rest];
}

/** What a benchmark created (network namespaces, mounts), undone in reverse order by `close`; shaped like tap's `t` for test helpers. */
export interface Teardown {
  fns: Array<() => unknown>;
  teardown(fn: () => unknown): void;
}

export function scope(): Teardown {
  const t: Teardown = { fns: [], teardown: (fn) => void t.fns.push(fn) };
  return t;
}

export async function close(t: Teardown): Promise<void> {
  for (const fn of t.fns.reverse()) await fn();
}

/** Compiles bench/<name>.c into a temp binary. */
export function compile(name: string): string {
  const out = path.join(os.tmpdir(), `dyadfs-bench-${name}-${process.pid}`);
  execFileSync('cc', ['-O2', '-o', out, path.join(repoRoot, 'bench', `${name}.c`)]);
  process.on('exit', () => fs.rmSync(out, { force: true }));
  return out;
}

/** dd throughput in GB/s (10^9 bytes per second), parsed from dd's summary. */
export function ddGBps(args: string[]): number {
  const out = run('dd', [...args, 'status=none', 'status=progress']);
  const m = /(\d+) bytes .* copied, ([\d.]+) s/.exec(out);
  if (!m) throw new Error(`cannot parse dd output: ${out}`);
  return Number(m[1]) / Number(m[2]) / 1e9;
}

export interface Row {
  what: string;
  value: number;
  unit: string;
  baseline?: { name: string; value: number };
  /** Which way is better, for the ratio's reading. */
  better: 'higher' | 'lower';
  target?: string;
}

export function printTable(title: string, rows: Row[]): void {
  console.log(`\n## ${title}\n`);
  console.log('| measurement | value | baseline (same run) | ratio | target |');
  console.log('| --- | --- | --- | --- | --- |');
  for (const r of rows) {
    const v = `${fmt(r.value)} ${r.unit}`;
    const b = r.baseline ? `${r.baseline.name}: ${fmt(r.baseline.value)} ${r.unit}` : '';
    const ratio = r.baseline ? `${(r.value / r.baseline.value).toFixed(2)}×` : '';
    console.log(`| ${r.what} | ${v} | ${b} | ${ratio} | ${r.target ?? ''} |`);
  }
}

function fmt(x: number): string {
  return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
}

export function dropCaches(): void {
  try {
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
  } catch {
    /* not root: warm numbers only */
  }
}

/**
 * Touches and frees memory in a child process. This VM's balloon returns
 * memory idle for ~2 s to the host (free page reporting), and the next GiB of
 * page cache then costs host page faults; touching it first makes every
 * variant start from the same state.
 */
export function prefault(mib: number): void {
  spawnSync(process.execPath, ['-e', `const b=[];for(let i=0;i<${mib};i++)b.push(Buffer.alloc(1<<20,1));`]);
}

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
  });
}

/**
 * ucx_perftest tag_bw 1 MiB between a server and a client process; GB/s
 * (10^9 B/s). `between`: run the server on one host and the client on
 * another (command prefixes entering each, and the server's address).
 */
export async function ucxPerftest(env: NodeJS.ProcessEnv, iters: number, between?: { enter: [string[], string[]]; addr: string }): Promise<number> {
  const port = await freePort();
  const server = spawn(...onHost(between?.enter[0] ?? [], 'ucx_perftest', ['-p', String(port)]), { env, stdio: 'ignore' });
  try {
    for (let i = 0; i < 50; i++) {
      await new Promise((r) => setTimeout(r, 100));
      const client = onHost(between?.enter[1] ?? [], 'ucx_perftest', [between?.addr ?? '127.0.0.1', '-p', String(port), '-t', 'tag_bw', '-s', '1048576', '-n', String(iters)]);
      const r = spawnSync(...client, { env, encoding: 'utf8' });
      const line = r.stdout.split('\n').find((l) => l.includes('Final:'));
      if (!line) continue;
      // Final: iters, latency typical/avg/overall, bandwidth (MiB/s) avg/overall, msg rate avg/overall
      const f = line.replace(/.*Final:/, '').trim().split(/\s+/).map(Number);
      return (f[5]! * 1048576) / 1e9;
    }
    return NaN;
  } finally {
    server.kill();
  }
}
