/**
 * npm run bench -- transfer: producer → consumer between two dyad-mount
 * daemons on this machine (node 0 serves the embedded KVS), with the
 * baselines measured in the same run.
 *
 * (a) 1,000 × 4 KiB produced first, then consumed: open-to-close per file
 * (b) 16 × 64 MiB produced first: consumer GB/s, beside a raw Node TCP
 *     stream between the same two endpoints, a local read, and the pull's
 *     data path written in C (bench/pipeline.c), which says what the
 *     machine itself gives
 * (c) consumer started first: producer start → consumer done, both sizes
 * (d) producer write + publish per file (close() returns after publishing),
 *     the first 1000 files after the daemons start and the 1000 after them
 *
 * The programs doing the I/O are a small C loop (bench/files.c), as an
 * unmodified application would be.
 *
 * Small files travel with their publication by default (--push-max), so
 * (a) and (c) are also measured with --push-max 0, where every file is
 * pulled through the transport; and (a), (c), (d) once more with --spin 100,
 * where the daemons poll /dev/fuse briefly after each request instead of
 * sleeping (a wake-up costs tens of microseconds on the project VM).
 * (d) also from a program holding 256 more descriptors (a publishing close()
 * looks at each), and with --async-publish, which skips that.
 * (a), (c), (d) with --kernel-permissions too: the kernel checking
 * permissions asks for a directory's attributes after each file created.
 * (a), (c), (d) once more with each daemon and the programs using its mount
 * kept on one CPU (taskset), against the same placed by the scheduler: a
 * program woken at a reply on another, idle vCPU waits for that vCPU too.
 *
 * --dtl ucx [--tls tcp|shm]: the same workloads over the TCP transport and
 * then over UCX, with ucx_perftest tag_bw between two processes on the same
 * transport, all in one run.
 *
 * Where the two nodes are: on loopback by default; with --netns (the default
 * for --dtl ucx over tcp, whose targets were set there; --loopback turns it
 * off) on two test hosts, network namespaces joined by veth links and a
 * bridge. Every baseline then runs between the same two hosts.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { close, compile, onHost, prefault, printTable, repoRoot, run, scope, ucxPerftest, type Row } from './lib.js';
import { withUcxDefaults } from '../src/dtl/ucx/native.js';
import { network } from '../test/helpers/netns.js';

interface Node {
  mnt: string;
  storage: string;
  log: string;
  /** The daemon's process id, as `dyad-mount --background` reports it. */
  pid: number;
}

interface Files {
  n: number;
  seconds: number;
  medianUs: number;
  p99Us: number;
  bytes: number;
}

function parseFiles(out: string): Files {
  const [n, seconds, medianUs, p99Us, , bytes] = out.trim().split(/\s+/).map(Number);
  return { n: n!, seconds: seconds!, medianUs: medianUs!, p99Us: p99Us!, bytes: bytes! };
}

const mountBin = path.join(repoRoot, 'bin', 'dyad-mount.js');

/** The CPUs this process may run on (Cpus_allowed_list: "0-3,6"), in order. */
function allowedCpus(): number[] {
  const line = /^Cpus_allowed_list:\s*(\S+)/m.exec(fs.readFileSync('/proc/self/status', 'utf8'))?.[1] ?? '';
  return line.split(',').filter((part) => part !== '').flatMap((part) => {
    const [lo, hi = lo] = part.split('-').map(Number);
    return lo === undefined || !Number.isInteger(lo) || !Number.isInteger(hi) ? [] : Array.from({ length: hi! - lo + 1 }, (_, i) => lo + i);
  });
}

/** `cmd args` kept on one CPU (taskset) when `cpu` is given, else as they are. */
function onCpu(cpu: number | undefined, cmd: string, args: string[]): [string, string[]] {
  return cpu === undefined ? [cmd, args] : ['taskset', ['-c', String(cpu), cmd, ...args]];
}

function startNode(base: string, rank: 0 | 1, hosts: Hosts, kvsArgs: string[], extra: string[], cpu?: number): Node {
  const mnt = path.join(base, `n${rank}`);
  const storage = path.join(base, `s${rank}`);
  fs.mkdirSync(mnt);
  fs.mkdirSync(storage);
  const log = `${mnt}.log`;
  const said = runOn(hosts.enter[rank], ...onCpu(cpu, process.execPath, [mountBin, '--background', '--log', log, '--storage', storage, '--rank', String(rank), '--listen', `${hosts.addr[rank]}:0`, ...kvsArgs, ...extra, mnt]));
  const pid = Number(/daemon pid (\d+)/.exec(said)?.[1]);
  if (!Number.isInteger(pid)) throw new Error(`no daemon pid in what dyad-mount printed: ${said}`);
  return { mnt, storage, log, pid };
}

/**
 * CPU time of a daemon's main thread (the one that answers every FUSE
 * request), user and system, in microseconds. The kernel counts it in clock
 * ticks (10 ms here): over 1000 files that is within a few per cent.
 */
function mainThreadCpuUs(pid: number): { user: number; sys: number } {
  const stat = fs.readFileSync(`/proc/${pid}/task/${pid}/stat`, 'utf8');
  // Fields 14 and 15, counted after the command name, which may hold spaces.
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const tick = 1e6 / CLOCK_TICKS;
  return { user: Number(f[14 - 3]) * tick, sys: Number(f[15 - 3]) * tick };
}

/** sysconf(_SC_CLK_TCK): 100 on every Linux port that Node runs on. */
const CLOCK_TICKS = 100;

async function rawTcp(mib: number, hosts: Hosts): Promise<number> {
  const script = path.join(repoRoot, 'dist', 'bench', 'rawtcp.js');
  const server = spawn(...onHost(hosts.enter[0], process.execPath, [script, 'serve', hosts.addr[0], '0', String(mib)]));
  const port = await new Promise<string>((resolve) => server.stdout.once('data', (d: Buffer) => resolve(d.toString().trim())));
  const out = runOn(hosts.enter[1], process.execPath, [script, 'recv', hosts.addr[0], port]);
  server.kill();
  return Number(out.trim());
}

/**
 * Where the two nodes are: both on loopback, or (--netns) each in a network
 * namespace of its own, joined by veth links and a bridge, as two test
 * hosts (test/helpers/netns.ts). Host 0 is the producer, host 1 the consumer.
 */
interface Hosts {
  addr: [string, string];
  /** Command prefix that runs a program on host 0 / host 1 (empty on loopback). */
  enter: [string[], string[]];
  /** Host 0's network namespace, for bench/pipeline.c's sender; none on loopback. */
  ns0?: string;
  /** The interface UCX must use (UCX_NET_DEVICES). */
  device: string;
}

const loopback: Hosts = { addr: ['127.0.0.1', '127.0.0.1'], enter: [[], []], device: 'lo' };

/** Runs `cmd args` on a host and returns its output. */
function runOn(enter: string[], cmd: string, args: string[]): string {
  return run(...onHost(enter, cmd, args));
}

/** The C programs the workloads run (bench/files.c, bench/pipeline.c, compiled) and where the nodes are. */
interface Tools {
  files: string;
  pipeline: string;
  hosts: Hosts;
}

/** Every figure of one run of the workloads over one transport. */
interface Figures {
  aLocal: Files;
  aRemote: Files;
  aAgain: Files;
  bRemoteGBps: number;
  bLocalGBps: number;
  /** The same bytes through bench/pipeline.c: sendfile → recv → pwrite → rename → read, in C. */
  pipelineGBps: number;
  bWriteGBps: number;
  rawGBps: number;
  cSmallS: number;
  cBigS: number;
  dDirect: Files;
  dMount: Files;
  /** The next 1000 files, from the same daemons: what a long-running producer node sees. */
  dWarm: Files;
  /** CPU of the producer's daemon main thread during dWarm, per file, in microseconds. */
  dWarmCpuUs: { user: number; sys: number };
  /** The same writes from a program holding MANY_FDS more descriptors. */
  dMany: Files;
}

/** Descriptors a process of a large parallel program may hold (sockets, shared memory, devices). */
const MANY_FDS = 256;

const gbps = (f: Files) => f.bytes / f.seconds / 1e9;

/** The small-file workloads alone, run again with other daemon flags (--push-max 0, --spin). */
interface PulledSmall {
  aRemote: Files;
  dMount: Files;
  dMany: Files;
  cSmallS: number;
}

/** Runs of the same small-file workloads, as one: each figure the mean of the runs'. */
function meanPulled(runs: PulledSmall[]): PulledSmall {
  const mean = (f: (p: PulledSmall) => number): number => runs.reduce((sum, p) => sum + f(p), 0) / runs.length;
  const files = (f: (p: PulledSmall) => Files): Files => ({
    n: mean((p) => f(p).n),
    seconds: mean((p) => f(p).seconds),
    medianUs: mean((p) => f(p).medianUs),
    p99Us: mean((p) => f(p).p99Us),
    bytes: mean((p) => f(p).bytes),
  });
  return { aRemote: files((p) => p.aRemote), dMount: files((p) => p.dMount), dMany: files((p) => p.dMany), cSmallS: mean((p) => p.cSmallS) };
}

/** Two daemons (node 0 serves the KVS) pulling over `dtl`; the workloads (a)-(d) and their baselines. */
async function measure(dtl: string, small: number, bigCount: number, bigMiB: number, tools: Tools): Promise<Figures>;
/**
 * `cpus`: node 0's daemon and the programs writing on it run on the first of
 * these CPUs, node 1's and the programs reading there on the second
 * (taskset; the small files only).
 */
async function measure(dtl: string, small: number, bigCount: number, bigMiB: number, tools: Tools, smallOnlyWith: string[], cpus?: [number, number]): Promise<PulledSmall>;
async function measure(dtl: string, small: number, bigCount: number, bigMiB: number, tools: Tools, smallOnlyWith?: string[], cpus?: [number, number]): Promise<Figures | PulledSmall> {
  const { files, hosts } = tools;
  const [at0, at1] = cpus ?? [undefined, undefined];
  // Programs that write run beside node 0's daemon, programs that read beside node 1's.
  const write = (args: string[], opts?: { env?: NodeJS.ProcessEnv }) => run(...onCpu(at0, files, ['write', ...args]), opts);
  const read = (args: string[]) => run(...onCpu(at1, files, ['read', ...args]));
  const daemonArgs = ['--dtl', dtl, ...(smallOnlyWith ?? [])];
  const base = fs.mkdtempSync(path.join(os.tmpdir(), 'dyadfs-xfer-'));
  const nodes: Node[] = [];
  try {
    const n0 = startNode(base, 0, hosts, ['--kvs-serve', `${hosts.addr[0]}:0`, '--kvs-data', path.join(base, 'kvs')], daemonArgs, at0);
    nodes.push(n0);
    const url = /serving the embedded KVS at (dyad:\/\/\S+)/.exec(fs.readFileSync(n0.log, 'utf8'))![1]!;
    const n1 = startNode(base, 1, hosts, ['--kvs', url, '--secret-file', path.join(base, 'kvs', 'secrets', 'dyad.secret')], daemonArgs, at1);
    nodes.push(n1);
    const direct = path.join(base, 'direct');
    for (const d of ['small', 'small-warm', 'small-many', 'big', 'c-small', 'c-big']) fs.mkdirSync(path.join(n0.mnt, d));
    fs.mkdirSync(path.join(direct, 'small'), { recursive: true });
    fs.mkdirSync(path.join(direct, 'big'), { recursive: true });

    // (d) write + publish, beside the same writes straight to a local directory.
    const dDirect = parseFiles(write([path.join(direct, 'small'), 'f', String(small), '4096']));
    const dMount = parseFiles(write([path.join(n0.mnt, 'small'), 'f', String(small), '4096']));
    // The same again: the first run above also pays for the daemons' start
    // (code compiled on first use, caches filling), which a producer node
    // pays once per job, not per file.
    const cpu0 = mainThreadCpuUs(n0.pid);
    const dWarm = parseFiles(write([path.join(n0.mnt, 'small-warm'), 'f', String(small), '4096']));
    const cpu1 = mainThreadCpuUs(n0.pid);
    const dWarmCpuUs = { user: (cpu1.user - cpu0.user) / small, sys: (cpu1.sys - cpu0.sys) / small };
    const dMany = parseFiles(write([path.join(n0.mnt, 'small-many'), 'f', String(small), '4096'], { env: { ...process.env, FILES_EXTRA_FDS: String(MANY_FDS) } }));
    // (a) consume what was produced, beside a local read of the same files.
    const aLocal = parseFiles(read([path.join(direct, 'small'), 'f', String(small)]));
    const aRemote = parseFiles(read([path.join(n1.mnt, 'small'), 'f', String(small)]));
    const aAgain = parseFiles(read([path.join(n1.mnt, 'small'), 'f', String(small)]));

    // (c) consumer first, both sizes (run below).
    const consumerFirst = async (dir: string, count: number, size: number) => {
      const cons = spawn(...onCpu(at1, files, ['read', path.join(n1.mnt, dir), 'f', String(count)]));
      await new Promise((r) => setTimeout(r, 500)); // let it block on the first open
      const t0 = process.hrtime.bigint();
      const done = new Promise<void>((resolve, reject) => cons.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`consumer exited ${code}`)))));
      write([path.join(n0.mnt, dir), 'f', String(count), String(size)]);
      await done;
      return Number(process.hrtime.bigint() - t0) / 1e9;
    };
    if (smallOnlyWith) return { aRemote, dMount, dMany, cSmallS: await consumerFirst('c-small', small, 4096) };

    // (b) big files produced first.
    prefault(bigCount * bigMiB * 2);
    write([path.join(n0.mnt, 'big'), 'b', String(bigCount), String(bigMiB << 20)]);
    prefault(bigCount * bigMiB * 2);
    // What a consumer must at least pay: writing the bytes into local storage.
    const bWrite = parseFiles(write([path.join(direct, 'big'), 'b', String(bigCount), String(bigMiB << 20)]));
    const rawGBps = await rawTcp(bigCount * bigMiB, hosts);
    prefault(bigCount * bigMiB * 2);
    const bRemote = parseFiles(read([path.join(n1.mnt, 'big'), 'b', String(bigCount)]));
    const bLocal = parseFiles(read([path.join(direct, 'big'), 'b', String(bigCount)]));
    prefault(bigCount * bigMiB * 2);
    const pipeDir = path.join(base, 'pipeline');
    fs.mkdirSync(pipeDir);
    const across = hosts.ns0 ? [hosts.ns0, hosts.addr[1]] : [];
    const [, pipeS, pipeBytes] = runOn(hosts.enter[1], tools.pipeline, [path.join(direct, 'big'), 'b', String(bigCount), pipeDir, ...across]).trim().split(/\s+/).map(Number);
    fs.rmSync(pipeDir, { recursive: true });

    const cSmallS = await consumerFirst('c-small', small, 4096);
    prefault(bigCount * bigMiB * 2);
    const cBigS = await consumerFirst('c-big', bigCount, bigMiB << 20);
    return { aLocal, aRemote, aAgain, bRemoteGBps: gbps(bRemote), bLocalGBps: gbps(bLocal), pipelineGBps: pipeBytes! / pipeS! / 1e9, bWriteGBps: gbps(bWrite), rawGBps, cSmallS, cBigS, dDirect, dMount, dWarm, dWarmCpuUs, dMany };
  } finally {
    for (const n of nodes.reverse()) spawnSync('umount', [n.mnt]);
    await new Promise((r) => setTimeout(r, 500));
    fs.rmSync(base, { recursive: true, force: true });
  }
}

/** The rows for one transport against its local and raw-TCP baselines (the issue 3 targets). */
function transportRows(f: Figures, small: number, bigCount: number): Row[] {
  return [
    { what: `(a) remote 4 KiB open-to-close, median`, value: f.aRemote.medianUs / 1000, unit: 'ms', baseline: { name: 'local read', value: f.aLocal.medianUs / 1000 }, better: 'lower', target: '≤ 0.3 ms (DYAD 1.34 ms FLUX_RPC)' },
    { what: `(a) remote 4 KiB open-to-close, p99`, value: f.aRemote.p99Us / 1000, unit: 'ms', baseline: { name: 'local read', value: f.aLocal.p99Us / 1000 }, better: 'lower' },
    { what: `(a) second read of the pulled files, median`, value: f.aAgain.medianUs / 1000, unit: 'ms', baseline: { name: 'local read', value: f.aLocal.medianUs / 1000 }, better: 'lower' },
    { what: `(b) ${bigCount} × 64 MiB pull`, value: f.bRemoteGBps, unit: 'GB/s', baseline: { name: 'raw Node TCP stream', value: f.rawGBps }, better: 'higher', target: '≥ 1.7 GB/s and ≥ 0.6× raw TCP (DYAD 0.105 / 0.337)' },
    { what: `(b) ${bigCount} × 64 MiB pull vs its data path in C (no FUSE, no checksum)`, value: f.bRemoteGBps, unit: 'GB/s', baseline: { name: 'bench/pipeline.c', value: f.pipelineGBps }, better: 'higher' },
    { what: `(b) ${bigCount} × 64 MiB pull vs local read`, value: f.bRemoteGBps, unit: 'GB/s', baseline: { name: 'local read', value: f.bLocalGBps }, better: 'higher' },
    { what: `(b) ${bigCount} × 64 MiB pull vs writing the same bytes locally`, value: f.bRemoteGBps, unit: 'GB/s', baseline: { name: 'local write', value: f.bWriteGBps }, better: 'higher' },
    { what: `(c) consumer first, ${small} × 4 KiB, producer start → consumer done`, value: f.cSmallS, unit: 's', better: 'lower', target: '≤ 1 s (DYAD 4.7 s)' },
    { what: `(c) consumer first, ${bigCount} × 64 MiB, producer start → consumer done`, value: f.cBigS, unit: 's', better: 'lower' },
    { what: `(d) producer write + publish per 4 KiB file, median`, value: f.dMount.medianUs / 1000, unit: 'ms', baseline: { name: 'local write', value: f.dDirect.medianUs / 1000 }, better: 'lower', target: '≤ 0.3 ms (DYAD 3.5 ms)' },
    { what: `(d) producer write + publish per 4 KiB file, p99`, value: f.dMount.p99Us / 1000, unit: 'ms', baseline: { name: 'local write', value: f.dDirect.p99Us / 1000 }, better: 'lower' },
    { what: `(d) the next ${small} files from the same daemons, median`, value: f.dWarm.medianUs / 1000, unit: 'ms', baseline: { name: 'first files after start', value: f.dMount.medianUs / 1000 }, better: 'lower', target: '≤ 0.3 ms' },
    { what: `(d) the next ${small} files from the same daemons, p99`, value: f.dWarm.p99Us / 1000, unit: 'ms', baseline: { name: 'first files after start', value: f.dMount.p99Us / 1000 }, better: 'lower' },
    // Near 1×, the producer waits on that one thread at every step: (d) goes down only with its CPU per file.
    { what: `(d) the next ${small} files: CPU of the producer daemon's main thread per file (user ${(f.dWarmCpuUs.user / 1000).toFixed(2)} + system ${(f.dWarmCpuUs.sys / 1000).toFixed(2)} ms)`, value: (f.dWarmCpuUs.user + f.dWarmCpuUs.sys) / 1000, unit: 'ms', baseline: { name: 'wall time per file, mean', value: (f.dWarm.seconds / f.dWarm.n) * 1000 }, better: 'lower' },
  ];
}

/** Small files pulled one by one (--push-max 0) beside the default, where they travel with their publication. */
function pulledRows(p: PulledSmall, f: Figures, small: number, label: string): Row[] {
  return [
    { what: `(a) remote 4 KiB open-to-close, every file pulled${label}, median`, value: p.aRemote.medianUs / 1000, unit: 'ms', baseline: { name: 'pushed with the publication', value: f.aRemote.medianUs / 1000 }, better: 'lower' },
    { what: `(c) consumer first, ${small} × 4 KiB, every file pulled${label}`, value: p.cSmallS, unit: 's', baseline: { name: 'pushed with the publication', value: f.cSmallS }, better: 'lower' },
    { what: `(d) producer write + publish per 4 KiB file, nothing pushed${label}, median`, value: p.dMount.medianUs / 1000, unit: 'ms', baseline: { name: 'pushed with the publication', value: f.dMount.medianUs / 1000 }, better: 'lower' },
  ];
}

/**
 * The daemons keep polling /dev/fuse for 100 µs after a request (--spin),
 * so a program's next request finds them awake: the default daemons beside.
 */
function spinRows(p: PulledSmall, f: Figures, small: number): Row[] {
  const base = 'default daemons (no spin)';
  return [
    { what: `(a) remote 4 KiB open-to-close with --spin 100, median`, value: p.aRemote.medianUs / 1000, unit: 'ms', baseline: { name: base, value: f.aRemote.medianUs / 1000 }, better: 'lower', target: '≤ 0.3 ms' },
    { what: `(c) consumer first, ${small} × 4 KiB with --spin 100`, value: p.cSmallS, unit: 's', baseline: { name: base, value: f.cSmallS }, better: 'lower', target: '≤ 1 s' },
    { what: `(d) producer write + publish per 4 KiB file with --spin 100, median`, value: p.dMount.medianUs / 1000, unit: 'ms', baseline: { name: base, value: f.dMount.medianUs / 1000 }, better: 'lower', target: '≤ 0.3 ms' },
    { what: `(d) producer write + publish per 4 KiB file with --spin 100, p99`, value: p.dMount.p99Us / 1000, unit: 'ms', baseline: { name: base, value: f.dMount.p99Us / 1000 }, better: 'lower' },
  ];
}

/**
 * The kernel checking permissions (default_permissions) instead of the
 * daemon: it then asks for a directory's attributes again after every file
 * created in it.
 */
function kernelPermissionRows(k: PulledSmall, f: Figures, small: number): Row[] {
  const base = 'the daemon checking (default)';
  return [
    { what: `(d) producer write + publish per 4 KiB file with --kernel-permissions, median`, value: k.dMount.medianUs / 1000, unit: 'ms', baseline: { name: base, value: f.dMount.medianUs / 1000 }, better: 'lower' },
    { what: `(a) remote 4 KiB open-to-close with --kernel-permissions, median`, value: k.aRemote.medianUs / 1000, unit: 'ms', baseline: { name: base, value: f.aRemote.medianUs / 1000 }, better: 'lower' },
    { what: `(c) consumer first, ${small} × 4 KiB with --kernel-permissions`, value: k.cSmallS, unit: 's', baseline: { name: base, value: f.cSmallS }, better: 'lower' },
  ];
}

/**
 * A publishing close() reads each of the closer's descriptors from /proc (to
 * know whether more writes may follow); --async-publish publishes at the last
 * release instead and skips that.
 */
function manyFdsRows(a: PulledSmall, f: Figures, small: number): Row[] {
  return [
    { what: `(d) producer holding ${MANY_FDS} more descriptors, per 4 KiB file, median`, value: f.dMany.medianUs / 1000, unit: 'ms', baseline: { name: `the ${small} files before, same daemons`, value: f.dWarm.medianUs / 1000 }, better: 'lower' },
    { what: `(d) the same with --async-publish, median`, value: a.dMany.medianUs / 1000, unit: 'ms', baseline: { name: 'close() waiting for the publication', value: f.dMany.medianUs / 1000 }, better: 'lower' },
    { what: `(d) producer write + publish per 4 KiB file with --async-publish, median`, value: a.dMount.medianUs / 1000, unit: 'ms', baseline: { name: 'close() waiting for the publication', value: f.dMount.medianUs / 1000 }, better: 'lower' },
  ];
}

/**
 * Each daemon kept on one CPU with the programs using its mount (taskset),
 * against the same workloads placed by the scheduler, in the order free,
 * kept, kept, free (each figure the mean of its two runs). A program waiting
 * on the daemon sleeps, and is woken at every reply: on another CPU, an idle
 * one on this VM, that wake-up costs both sides tens of microseconds.
 */
function placementRows(kept: PulledSmall, free: PulledSmall, small: number): Row[] {
  const base = 'placed by the scheduler (mean of 2 runs)';
  return [
    { what: `(d) producer on its daemon's CPU, first ${small} files after start, median (mean of 2 runs)`, value: kept.dMount.medianUs / 1000, unit: 'ms', baseline: { name: base, value: free.dMount.medianUs / 1000 }, better: 'lower' },
    { what: `(d) producer on its daemon's CPU, first ${small} files after start, p99 (mean of 2 runs)`, value: kept.dMount.p99Us / 1000, unit: 'ms', baseline: { name: base, value: free.dMount.p99Us / 1000 }, better: 'lower' },
    { what: `(a) consumer on its daemon's CPU, remote 4 KiB open-to-close, median (mean of 2 runs)`, value: kept.aRemote.medianUs / 1000, unit: 'ms', baseline: { name: base, value: free.aRemote.medianUs / 1000 }, better: 'lower' },
    { what: `(c) consumer first, ${small} × 4 KiB, each program on its daemon's CPU (mean of 2 runs)`, value: kept.cSmallS, unit: 's', baseline: { name: base, value: free.cSmallS }, better: 'lower' },
  ];
}

/** UCX beside the TCP transport and ucx_perftest, all from the same run. */
function ucxRows(u: Figures, tcp: Figures, uPulled: PulledSmall, tcpPulled: PulledSmall, perftest: { tuned: number; plain: number }, tls: string, small: number, bigCount: number): Row[] {
  const dyadUcx = 0.337;
  return [
    { what: `(b) ${bigCount} × 64 MiB pull over UCX (${tls})`, value: u.bRemoteGBps, unit: 'GB/s', baseline: { name: `ucx_perftest tag_bw (${tls}), the daemons' UCX settings`, value: perftest.tuned }, better: 'higher', target: '≥ 0.8× ucx_perftest' },
    { what: `(b) ${bigCount} × 64 MiB pull over UCX (${tls}) vs ucx_perftest with UCX's own defaults`, value: u.bRemoteGBps, unit: 'GB/s', baseline: { name: `ucx_perftest tag_bw (${tls}), UCX defaults`, value: perftest.plain }, better: 'higher' },
    { what: `(b) ${bigCount} × 64 MiB pull over UCX vs DYAD's UCX DTL`, value: u.bRemoteGBps, unit: 'GB/s', baseline: { name: 'DYAD UCX DTL (reference, not this run)', value: dyadUcx }, better: 'higher', target: '≥ 6×' },
    { what: `(b) ${bigCount} × 64 MiB pull over UCX vs its data path in C (TCP, no FUSE, no checksum)`, value: u.bRemoteGBps, unit: 'GB/s', baseline: { name: 'bench/pipeline.c', value: u.pipelineGBps }, better: 'higher' },
    { what: `(b) ${bigCount} × 64 MiB pull over UCX vs the TCP transport`, value: u.bRemoteGBps, unit: 'GB/s', baseline: { name: 'TCP transport', value: tcp.bRemoteGBps }, better: 'higher' },
    { what: `(a) remote 4 KiB open-to-close over UCX, median`, value: u.aRemote.medianUs / 1000, unit: 'ms', baseline: { name: 'TCP transport', value: tcp.aRemote.medianUs / 1000 }, better: 'lower', target: '≤ TCP transport' },
    { what: `(a) remote 4 KiB open-to-close over UCX, p99`, value: u.aRemote.p99Us / 1000, unit: 'ms', baseline: { name: 'TCP transport', value: tcp.aRemote.p99Us / 1000 }, better: 'lower' },
    { what: `(a) remote 4 KiB over UCX, every file pulled (--push-max 0), median (mean of 2 runs each)`, value: uPulled.aRemote.medianUs / 1000, unit: 'ms', baseline: { name: 'TCP transport, every file pulled', value: tcpPulled.aRemote.medianUs / 1000 }, better: 'lower', target: '≤ TCP transport' },
    { what: `(c) consumer first, ${small} × 4 KiB over UCX, every file pulled (mean of 2 runs each)`, value: uPulled.cSmallS, unit: 's', baseline: { name: 'TCP transport, every file pulled', value: tcpPulled.cSmallS }, better: 'lower' },
    { what: `(c) consumer first, ${small} × 4 KiB over UCX`, value: u.cSmallS, unit: 's', baseline: { name: 'TCP transport', value: tcp.cSmallS }, better: 'lower' },
    { what: `(c) consumer first, ${bigCount} × 64 MiB over UCX`, value: u.cBigS, unit: 's', baseline: { name: 'TCP transport', value: tcp.cBigS }, better: 'lower' },
    { what: `(d) producer write + publish per 4 KiB file (UCX daemons)`, value: u.dMount.medianUs / 1000, unit: 'ms', baseline: { name: 'TCP daemons', value: tcp.dMount.medianUs / 1000 }, better: 'lower' },
  ];
}

export async function main(args: string[]): Promise<void> {
  const quick = args.includes('--quick');
  const dtlIdx = args.indexOf('--dtl');
  const dtl = (dtlIdx >= 0 ? args[dtlIdx + 1]! : 'tcp').toUpperCase();
  const tlsIdx = args.indexOf('--tls');
  const small = quick ? 300 : 1000;
  const bigCount = quick ? 4 : 16;
  const bigMiB = 64;
  const ucx = dtl.startsWith('U');
  const tls = tlsIdx >= 0 ? args[tlsIdx + 1]! : 'tcp';
  // The UCX targets were set between network namespaces over tcp, so that is
  // where --dtl ucx runs unless told --loopback; the TCP bench runs on
  // loopback unless told --netns. Shared memory needs no network.
  const netns = tls === 'tcp' && (args.includes('--netns') || (ucx && !args.includes('--loopback')));
  const t = scope();
  try {
    const net = netns ? network(t, 2) : null;
    const hosts: Hosts = net
      ? { addr: [net.hosts[0]!.addr, net.hosts[1]!.addr], enter: [net.hosts[0]!.enter, net.hosts[1]!.enter], ns0: `/run/netns/${net.hosts[0]!.ns}`, device: 'eth0' }
      : loopback;
    await runAll({ dtl, ucx, tls, small, bigCount, bigMiB, tools: { files: compile('files'), pipeline: compile('pipeline'), hosts } });
  } finally {
    await close(t);
  }
}

async function runAll(o: { dtl: string; ucx: boolean; tls: string; small: number; bigCount: number; bigMiB: number; tools: Tools }): Promise<void> {
  const { dtl, ucx, tls, small, bigCount, bigMiB, tools } = o;
  const where = tools.hosts.ns0 ? `two test hosts (network namespaces, ${tools.hosts.addr.join(' and ')})` : 'two daemons on loopback';
  console.log(`# dyad-fs transfer benchmark (${dtl}): ${small} × 4 KiB, ${bigCount} × ${bigMiB} MiB, ${where}`);
  console.log(`# ${os.cpus().length} CPUs, kernel ${os.release()}, node ${process.version}`);
  if (!ucx) {
    const f = await measure(dtl, small, bigCount, bigMiB, tools);
    const pulled = await measure(dtl, small, bigCount, bigMiB, tools, ['--push-max', '0']);
    const spun = await measure(dtl, small, bigCount, bigMiB, tools, ['--spin', '100']);
    const async = await measure(dtl, small, bigCount, bigMiB, tools, ['--async-publish']);
    const kernel = await measure(dtl, small, bigCount, bigMiB, tools, ['--kernel-permissions']);
    const placed: Record<'free' | 'kept', PulledSmall[]> = { free: [], kept: [] };
    const [cpuA, cpuB] = allowedCpus();
    if (cpuA !== undefined && cpuB !== undefined) {
      for (const how of ['free', 'kept', 'kept', 'free'] as const) placed[how].push(await measure(dtl, small, bigCount, bigMiB, tools, [], how === 'kept' ? [cpuA, cpuB] : undefined));
    }
    printTable(`Transfer (${dtl})`, transportRows(f, small, bigCount));
    printTable(`Small files without --push-max (${dtl}, same run)`, pulledRows(pulled, f, small, ''));
    printTable(`Small files with --spin 100 (${dtl}, same run)`, spinRows(spun, f, small));
    printTable(`A producer holding many descriptors, and --async-publish (${dtl}, same run)`, manyFdsRows(async, f, small));
    printTable(`Permissions checked by the kernel (${dtl}, same run)`, kernelPermissionRows(kernel, f, small));
    if (placed.kept.length) printTable(`Each program on its daemon's CPU (${dtl}, same run)`, placementRows(meanPulled(placed.kept), meanPulled(placed.free), small));
    return;
  }
  // Two daemons on one machine: without these UCX would pick shared memory
  // (even between namespaces). --tls shm measures that path instead
  // (perftest then uses it too).
  process.env.UCX_TLS = tls === 'shm' ? 'sm,self' : tls;
  if (tls === 'tcp') process.env.UCX_NET_DEVICES = tools.hosts.device;
  console.log(`# UCX_TLS=${process.env.UCX_TLS}${process.env.UCX_NET_DEVICES ? ` UCX_NET_DEVICES=${process.env.UCX_NET_DEVICES}` : ''}`);
  const tcp = await measure('TCP', small, bigCount, bigMiB, tools);
  prefault(bigCount * bigMiB * 2);
  // With the daemons' UCX settings, so that the baseline moves data the same
  // way, and with UCX's own defaults.
  const between = { enter: tools.hosts.enter, addr: tools.hosts.addr[0] };
  const perf = { tuned: await ucxPerftest(withUcxDefaults(process.env), 2000, between), plain: await ucxPerftest(process.env, 2000, between) };
  prefault(bigCount * bigMiB * 2);
  const u = await measure('UCX', small, bigCount, bigMiB, tools);
  // Every file pulled: the two transports differ by tens of microseconds,
  // about what this VM drifts by in a minute, so they run in the order TCP,
  // UCX, UCX, TCP and each figure is the mean of its two runs.
  const pulledRuns: Record<'TCP' | 'UCX', PulledSmall[]> = { TCP: [], UCX: [] };
  for (const d of ['TCP', 'UCX', 'UCX', 'TCP'] as const) pulledRuns[d].push(await measure(d, small, bigCount, bigMiB, tools, ['--push-max', '0']));
  const tcpPulled = meanPulled(pulledRuns.TCP);
  const uPulled = meanPulled(pulledRuns.UCX);
  console.log(`# every file pulled, (a) medians per run: TCP ${pulledRuns.TCP.map((p) => (p.aRemote.medianUs / 1000).toFixed(3)).join(' ')}, UCX ${pulledRuns.UCX.map((p) => (p.aRemote.medianUs / 1000).toFixed(3)).join(' ')} ms`);
  printTable(`Transfer (TCP transport, same run)`, transportRows(tcp, small, bigCount));
  printTable(`Small files without --push-max (TCP transport, same run)`, pulledRows(tcpPulled, tcp, small, ', mean of 2 runs'));
  printTable(`Transfer (UCX over ${tls}) beside the TCP transport and ucx_perftest`, ucxRows(u, tcp, uPulled, tcpPulled, perf, tls, small, bigCount));
}
