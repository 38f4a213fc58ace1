/**
 * Shared plumbing for the examples: a two-"node" dyad-fs cluster on one
 * machine, the tutorial's C programs built at run time, and jobs run on a
 * node with their output and timing captured.
 *
 * A "node" here is a dyad-mount daemon over its own directory, exactly what
 * would run on each compute node of a real allocation; only the directories
 * and loopback ports say they share a machine. Everything started is
 * registered with a Teardown, whose undo is synchronous so that it can also
 * run from a signal handler or process 'exit' when the example itself fails.
 */
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

/** The repository root, from dist/examples/lib/cluster.js. */
export const repoRoot = fileURLToPath(new URL('../../../', import.meta.url));
const mountBin = path.join(repoRoot, 'bin', 'dyad-mount.js');
const dyadBin = path.join(repoRoot, 'bin', 'dyad.js');

/** A duration in milliseconds, shown in seconds. */
export function secs(ms: number): string {
  return `${(ms / 1000).toFixed(2)} s`;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Is pid still the daemon we started for mountpoint (and not a recycled pid)? */
function isOurDaemon(pid: number, mountpoint: string): boolean {
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes(mountpoint);
  } catch {
    return false;
  }
}

export function mountedUnder(dir: string): string[] {
  const prefix = dir.endsWith('/') ? dir : `${dir}/`;
  return fs
    .readFileSync('/proc/mounts', 'utf8')
    .split('\n')
    .map((l) => l.split(' '))
    .filter((f) => f[2] === 'fuse.dyad' && f[1] !== undefined && (f[1] === dir || f[1].startsWith(prefix)))
    .map((f) => f[1]!);
}

/**
 * Undo actions run last-registered first, once. Signals and 'exit' run them
 * too, so an interrupted or crashed example leaves no mount, daemon or temp
 * directory behind.
 */
export class Teardown {
  private readonly actions: { what: string; undo: () => void }[] = [];
  private readonly children = new Set<ChildProcess>();
  private done = false;
  readonly problems: string[] = [];

  constructor() {
    const onSignal = (sig: NodeJS.Signals, code: number) => {
      process.stderr.write(`\n${sig}: cleaning up\n`);
      this.run();
      process.exit(code);
    };
    process.once('SIGINT', () => onSignal('SIGINT', 130));
    process.once('SIGTERM', () => onSignal('SIGTERM', 143));
    process.once('exit', () => this.run());
  }

  add(what: string, undo: () => void): void {
    this.actions.push({ what, undo });
  }

  /** A job process to kill if we tear down while it still runs. */
  track(child: ChildProcess): void {
    this.children.add(child);
    child.once('exit', () => this.children.delete(child));
  }

  killJobs(): void {
    for (const c of this.children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  }

  run(): void {
    if (this.done) return;
    this.done = true;
    // A consumer still blocked in open() would keep its mount busy.
    this.killJobs();
    while (this.actions.length) {
      const a = this.actions.pop()!;
      try {
        a.undo();
      } catch (err) {
        this.problems.push(`${a.what}: ${(err as Error).message}`);
      }
    }
    for (const p of this.problems) process.stderr.write(`cleanup: ${p}\n`);
  }
}

/** A private temporary directory, removed at teardown (after the mounts in it are gone). */
export function makeWorkDir(td: Teardown, prefix: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  td.add(`remove ${dir}`, () => {
    const left = mountedUnder(dir);
    // Removing through a live mount would empty a node's storage under its daemon's
    // feet, and a dead one fails anyway: leave the directory for a human.
    if (left.length) throw new Error(`still mounted: ${left.join(', ')}; not removing ${dir}`);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}

export interface Programs {
  prod: string;
  cons: string;
}

/** Builds examples/c/{prod,cons}.c with the system compiler, as the tutorial's `make` does. */
/** Compiles examples/c/NAME.c into outDir; resolves to the binary's path. */
export async function buildProgram(outDir: string, name: string): Promise<string> {
  fs.mkdirSync(outDir, { recursive: true });
  const cc = process.env.CC ?? 'cc';
  const out = path.join(outDir, name);
  const src = path.join(repoRoot, 'examples', 'c', `${name}.c`);
  try {
    await execFileP(cc, ['-std=c11', '-O2', '-Wall', '-Wextra', '-o', out, src]);
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`${cc} ${src} failed: ${e.stderr?.trim() || e.message}`);
  }
  return out;
}

export async function buildPrograms(outDir: string): Promise<Programs> {
  const [prod, cons] = await Promise.all([buildProgram(outDir, 'prod'), buildProgram(outDir, 'cons')]);
  return { prod, cons };
}

export interface DyadNode {
  rank: number;
  /** The DYAD managed directory: the mountpoint, whose own contents are the node's storage. */
  dmd: string;
  log: string;
  pid: number;
  /** The dyad-mount command line, for the transcript. */
  command: string[];
}

export interface Cluster {
  root: string;
  kvsUrl: string;
  kvsData: string;
  namespace: string;
  secretFile: string;
  nodes: DyadNode[];
}

/** Runs bin/dyad.js (administration CLI); resolves to its stdout. */
export async function dyad(args: string[]): Promise<string> {
  const { stdout } = await execFileP(process.execPath, [dyadBin, ...args], { timeout: 15_000 });
  return stdout;
}

async function waitForLogLine(file: string, re: RegExp, ms: number): Promise<RegExpMatchArray> {
  const until = Date.now() + ms;
  for (;;) {
    // The daemon's log stream may still be flushing when --background returns.
    const m = fs.existsSync(file) ? fs.readFileSync(file, 'utf8').match(re) : null;
    if (m) return m;
    if (Date.now() > until) throw new Error(`${file}: no line matching ${re} after ${ms} ms`);
    await sleep(25);
  }
}

async function mountNode(td: Teardown, root: string, rank: number, extra: string[]): Promise<DyadNode> {
  const dmd = path.join(root, `node${rank}`, 'dmd');
  const log = path.join(root, `node${rank}.log`);
  fs.mkdirSync(dmd, { recursive: true });
  const args = ['--background', '--log', log, ...extra, '--rank', String(rank), dmd];
  let stdout: string;
  try {
    ({ stdout } = await execFileP(process.execPath, [mountBin, ...args], { timeout: 30_000 }));
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    const tail = fs.existsSync(log) ? fs.readFileSync(log, 'utf8').trim().split('\n').slice(-5).join('\n') : '';
    throw new Error(`dyad-mount for node ${rank} failed: ${e.stderr?.trim() || e.message}${tail ? `\n${tail}` : ''}`);
  }
  const m = stdout.match(/daemon pid (\d+)/);
  if (!m) throw new Error(`dyad-mount for node ${rank}: unexpected output ${JSON.stringify(stdout)}`);
  const node: DyadNode = { rank, dmd, log, pid: Number(m[1]), command: ['dyad-mount', ...args] };
  td.add(`unmount node ${rank}`, () => unmountNode(node));
  return node;
}

/**
 * The polite way first (dyad umount, after which the daemon exits by itself),
 * then signals, then a lazy unmount, so that teardown always ends with no mount
 * and no daemon whatever state the node was left in.
 */
function unmountNode(node: DyadNode): void {
  const mounted = () => mountedUnder(node.dmd).includes(node.dmd);
  const waitExit = (ms: number) => {
    const until = Date.now() + ms;
    while (pidAlive(node.pid) && isOurDaemon(node.pid, node.dmd) && Date.now() < until) sleepSync(25);
    return !(pidAlive(node.pid) && isOurDaemon(node.pid, node.dmd));
  };
  const umount = (lazy: boolean) => {
    try {
      execFileSync(process.execPath, [dyadBin, 'umount', ...(lazy ? ['--lazy'] : []), node.dmd], { stdio: 'pipe', timeout: 10_000 });
    } catch {
      /* judged by the state below */
    }
  };
  if (mounted()) umount(false);
  if (waitExit(5000) && !mounted()) return;
  for (const sig of ['SIGTERM', 'SIGKILL'] as const) {
    if (pidAlive(node.pid) && isOurDaemon(node.pid, node.dmd)) {
      process.kill(node.pid, sig);
      if (waitExit(3000)) break;
    }
  }
  if (mounted()) umount(true);
  if (mounted()) throw new Error(`${node.dmd} is still mounted`);
  if (pidAlive(node.pid) && isOurDaemon(node.pid, node.dmd)) throw new Error(`daemon ${node.pid} for ${node.dmd} did not exit`);
}

/**
 * Node 0 serves the embedded KVS (it creates the namespace, as `flux kvs
 * namespace create` would, and exports its secret); node 1 is its client.
 */
export async function startCluster(td: Teardown, root: string, namespace = 'dyad', extra: string[] = []): Promise<Cluster> {
  const kvsData = path.join(root, 'kvs');
  const ns = ['--namespace', namespace, ...extra];
  const n0 = await mountNode(td, root, 0, ['--kvs-serve', '127.0.0.1:0', '--kvs-data', kvsData, ...ns]);
  const url = (await waitForLogLine(n0.log, /serving the embedded KVS at (dyad:\/\/\S+)/, 5000))[1]!;
  const secretFile = path.join(kvsData, 'secrets', `${namespace}.secret`);
  const n1 = await mountNode(td, root, 1, ['--kvs', url, '--secret-file', secretFile, ...ns]);
  return { root, kvsUrl: url, kvsData, namespace, secretFile, nodes: [n0, n1] };
}

export interface JobResult {
  name: string;
  startMs: number;
  endMs: number;
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface Job {
  name: string;
  child: ChildProcess;
  startMs: number;
  /** Output so far. */
  stdout(): string;
  done: Promise<JobResult>;
}

/**
 * Starts a job: `mkdir -p DIR && PROG FILES DIR`, as the tutorial's
 * task_*.sh and c_*.sh scripts do on their node. No LD_PRELOAD, no DYAD
 * environment: the mount alone makes it a DYAD job.
 */
export function startJob(td: Teardown, name: string, prog: string, files: number, dir: string): Job {
  const startMs = performance.now();
  const child = spawn('/bin/sh', ['-c', 'mkdir -p "$1" && exec "$2" "$3" "$1"', name, dir, prog, String(files)], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  td.track(child);
  let out = '';
  let err = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  const done = new Promise<JobResult>((resolve) => {
    child.once('error', (e) => resolve({ name, startMs, endMs: performance.now(), code: null, signal: null, stdout: out, stderr: `${err}${e.message}\n` }));
    // 'close', not 'exit': the pipes must be drained to have all the output.
    child.once('close', (code, signal) => resolve({ name, startMs, endMs: performance.now(), code, signal, stdout: out, stderr: err }));
  });
  return { name, child, startMs, stdout: () => out, done };
}

/** Waits for a job, killing it after ms; a killed job resolves with signal SIGKILL. */
export async function finish(job: Job, ms: number): Promise<JobResult> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<void>((resolve) => (timer = setTimeout(resolve, ms)));
  const r = await Promise.race([job.done, timeout.then(() => undefined)]);
  clearTimeout(timer);
  if (r) return r;
  job.child.kill('SIGKILL');
  return job.done;
}

/**
 * Checks a consumer's output: exactly "File k validation: OK" for k = 0..files-1
 * and exit status 0. Returns a one-line verdict and whether it passed.
 */
export function checkConsumer(r: JobResult, files: number): { ok: boolean; verdict: string } {
  const lines = r.stdout.split('\n').filter((l) => l.length);
  const oks = lines.filter((l, i) => l === `File ${i} validation: OK`).length;
  const bad = lines.length - oks;
  const status = r.signal ? `killed by ${r.signal}` : `exit ${r.code}`;
  const ok = r.code === 0 && oks === files && lines.length === files;
  const verdict = `${oks}/${files} OK${bad ? `, ${bad} not OK` : ''}, ${status}`;
  return { ok, verdict };
}

/** `ls -l DIR`, indented, for the transcript. */
export function lsl(dir: string): string {
  try {
    return execFileSync('ls', ['-l', dir], { encoding: 'utf8', timeout: 5000 }).trimEnd();
  } catch (err) {
    return `ls: ${(err as Error).message}`;
  }
}

/** Where a process is blocked in the kernel (e.g. request_wait_answer: waiting on a FUSE reply). */
export function wchan(pid: number | undefined): string | undefined {
  if (pid === undefined) return undefined;
  try {
    return fs.readFileSync(`/proc/${pid}/wchan`, 'utf8').trim() || undefined;
  } catch {
    return undefined;
  }
}

export function indent(text: string, by = '      '): string {
  return text
    .split('\n')
    .map((l) => by + l)
    .join('\n');
}
