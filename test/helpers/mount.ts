/**
 * Test helpers: real mounts made by the real CLI (a separate daemon
 * process), or in-process for tests that need to look inside the daemon.
 * Every mount is torn down by the test that made it.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';

export const exec = promisify(execFile);
export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
export const dyadMountBin = path.join(repoRoot, 'bin', 'dyad-mount.js');
export const dyadBin = path.join(repoRoot, 'bin', 'dyad.js');

interface Tap {
  teardown(fn: () => unknown): void;
}

export function tmpdir(t: Tap, prefix = 'dyadfs-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export function isMountedAt(dir: string): boolean {
  const lines = fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n');
  return lines.some((l) => l.split(' ')[4] === dir);
}

export interface CliMount {
  mnt: string;
  log: string;
  pid: number;
  umount(): Promise<void>;
}

/** Mounts with `dyad-mount --background` and unmounts at teardown. */
export async function mountCli(t: Tap, mnt: string, args: string[] = [], prefix: string[] = []): Promise<CliMount> {
  const log = `${mnt}.log`;
  // Each mount gets its own KVS state unless the test says otherwise.
  const kvsArgs = args.some((a) => a === '--kvs' || a === '--kvs-data') ? [] : ['--kvs-data', `${mnt}.kvs`];
  const argv = [process.execPath, dyadMountBin, '--background', '--log', log, ...kvsArgs, ...args, mnt];
  // prefix: e.g. nsenter --net=... to start the daemon on another test host.
  const [cmd, ...rest] = [...prefix, ...argv] as [string, ...string[]];
  const { stdout } = await exec(cmd, rest);
  const pid = Number(/pid (\d+)/.exec(stdout)?.[1]);
  let done = false;
  const umount = async () => {
    if (done) return;
    done = true;
    if (isMountedAt(mnt)) await exec(process.execPath, [dyadBin, 'umount', mnt]).catch(() => exec('umount', ['-l', mnt]));
    await waitExit(pid);
  };
  t.teardown(umount);
  return { mnt, log, pid, umount };
}

export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

export async function waitExit(pid: number, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (alive(pid) && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
}

/** Runs a shell command line; resolves with exit code and output. */
export function sh(cmd: string, opts: { cwd?: string; timeoutMs?: number } = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn('bash', ['-c', cmd], { cwd: opts.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d));
    child.stderr.on('data', (d: Buffer) => (stderr += d));
    const timer = opts.timeoutMs ? setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs) : undefined;
    child.on('close', (code) => {
      if (timer) clearTimeout(timer);
      resolve({ code: code ?? -1, stdout, stderr });
    });
  });
}

/** Compiles a C fixture from test/fixtures once per process. */
const built = new Map<string, string>();
export function cFixture(name: string): string {
  const cached = built.get(name);
  if (cached) return cached;
  const out = path.join(os.tmpdir(), `dyadfs-fixture-${name}-${process.pid}`);
  execFileSync('cc', ['-O2', '-pthread', '-o', out, path.join(repoRoot, 'test', 'fixtures', `${name}.c`)]);
  built.set(name, out);
  process.on('exit', () => fs.rmSync(out, { force: true }));
  return out;
}

export interface Cluster {
  nodes: Array<CliMount & { storage: string; rank: number }>;
  kvsUrl: string;
  secretFile: string;
  base: string;
}

/**
 * N nodes on this machine, each a daemon over its own storage; node 0 serves
 * the embedded KVS and the others use it.
 */
export async function cluster(t: Tap, n: number, args: string[] = [], perNode: (rank: number) => string[] = () => []): Promise<Cluster> {
  const base = tmpdir(t);
  const nodes: Cluster['nodes'] = [];
  let kvsUrl = '';
  const secretFile = path.join(base, 'kvs', 'secrets', 'dyad.secret');
  for (let rank = 0; rank < n; rank++) {
    const mnt = path.join(base, `n${rank}`);
    const storage = path.join(base, `s${rank}`);
    fs.mkdirSync(mnt);
    fs.mkdirSync(storage);
    const kvs = rank === 0 ? ['--kvs-serve', '127.0.0.1:0', '--kvs-data', path.join(base, 'kvs')] : ['--kvs', kvsUrl, '--secret-file', secretFile];
    const m = await mountCli(t, mnt, [...kvs, '--rank', String(rank), '--storage', storage, ...args, ...perNode(rank)]);
    if (rank === 0) {
      const url = /serving the embedded KVS at (dyad:\/\/\S+)/.exec(fs.readFileSync(m.log, 'utf8'))?.[1];
      if (!url) throw new Error(`node 0 did not report its KVS URL: ${fs.readFileSync(m.log, 'utf8')}`);
      kvsUrl = url;
    }
    nodes.push({ ...m, storage, rank });
  }
  return { nodes, kvsUrl, secretFile, base };
}

/** A child's exit code and everything it printed, once it has exited. */
export const exited = (c: ChildProcess) =>
  new Promise<{ code: number | null; out: string; err: string }>((resolve) => {
    let out = '';
    let err = '';
    c.stdout?.on('data', (d: Buffer) => (out += d));
    c.stderr?.on('data', (d: Buffer) => (err += d));
    c.on('close', (code) => resolve({ code, out, err }));
  });

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** How many pulls a daemon's log (at debug level) records. */
export const pulls = (log: string) => fs.readFileSync(log, 'utf8').split('\n').filter((l) => l.includes(' pulled ')).length;

/**
 * A 1 MiB tmpfs mounted at `dir` (made here) until the test ends: a disk
 * that fills. False, with a comment, where tmpfs cannot be mounted (not root).
 */
export function smallTmpfs(t: Tap & { comment(msg: string): void }, dir: string): boolean {
  fs.mkdirSync(dir, { recursive: true });
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'dyad-test', dir], { stdio: 'ignore' });
  } catch {
    t.comment('cannot mount a tmpfs here (not root?): skipped');
    return false;
  }
  t.teardown(() => execFileSync('umount', ['-l', dir]));
  return true;
}
