/**
 * UCX transfer-layer benchmark: pull throughput of the UCX backend's two data
 * paths ('am' rendezvous, 'get' one-sided) beside the TCP backend and
 * ucx_perftest tag_bw between the same two endpoints, in the same run; then
 * small-file pull latency for UCX and TCP, and the owner's peak memory.
 * The owner runs in a child process, as it would on another node.
 *
 *   node dist/bench/transfer-ucx.js [--rounds 3] [--files 16] [--mib 64] [--small 1000]
 *        [--tls tcp] [--devices lo] [--chunk-kib 512] [--window 8] [--buffers 10]
 *        [--paths am,get,tcp] [--huge-mib 1024] [--no-perftest] [--no-prefault]
 *        [--bulk 2] [--no-receive-thread]
 *
 * Each pull figure also gives the consumer's CPU time per GiB: its main
 * thread's (which in a daemon also serves FUSE) and the whole process's
 * (with the native receive threads). --bulk sets the client's
 * maxBulkPerPeer; --no-receive-thread keeps UCX chunks on the main thread.
 *
 * --tls/--devices become UCX_TLS/UCX_NET_DEVICES for both processes and for
 * ucx_perftest (default tcp on lo: on one host UCX would otherwise use
 * shared memory). Each round deletes the previous output, syncs and
 * prefaults memory first; transfer-raw.ts explains why on the project VM.
 */
import { fork, execSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { digestBuffer, tcpBackend, Digester } from '../src/dtl/index.js';
import type { PullRequest, TransferClient } from '../src/dtl/index.js';
import { createUcxBackend, type UcxDataPath } from '../src/dtl/ucx/index.js';
import { loadUcx, withUcxDefaults } from '../src/dtl/ucx/native.js';
import type { IoMode } from '../src/dtl/inline.js';
import { ucxPerftest } from './lib.js';

/** CPU seconds used so far by this process's main thread (not its helpers). */
function mainThreadCpu(): number {
  const f = readFileSync(`/proc/self/task/${process.pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return (Number(f[11]) + Number(f[12])) / 100; // utime, stime in clock ticks (USER_HZ 100)
}

const SECRET = 'bench-secret';

interface Ready {
  ucx: string;
  tcp: string;
  /** Worker address (base64) of the child's raw receiver, for the binding-only measurement. */
  raw: string;
}

const RAW_AM = 0x77;

interface Mem {
  rss: number;
  maxRss: number;
  anon: number;
  file: number;
  stats?: unknown;
  /** The owner's CPU seconds so far, all threads. */
  cpuS: number;
}

/** Anonymous and file-backed resident memory: mapped files count in RSS but are page cache. */
function anon(): { anon: number; file: number } {
  const s = readFileSync('/proc/self/status', 'utf8');
  const kb = (k: string): number => Number(new RegExp(`${k}:\\s+(\\d+)`).exec(s)?.[1] ?? 0) * 1024;
  return { anon: kb('RssAnon'), file: kb('RssFile') + kb('RssShmem') };
}

/** Child: the owner, serving `root` over UCX and TCP. */
async function child(root: string, chunkBytes: number, window: number, readMode: IoMode): Promise<void> {
  const backend = createUcxBackend({ spinUs: Number(process.env.DYAD_BENCH_SPIN_US ?? 0) });
  const ucx = await backend.serve({ root, host: '127.0.0.1', port: 0, secret: SECRET, chunkBytes, window, readMode });
  const tcp = await tcpBackend.serve({ root, host: '127.0.0.1', port: 0, secret: SECRET });
  process.on('message', () => {
    const u = process.cpuUsage();
    const m: Mem = { rss: process.memoryUsage().rss, maxRss: process.resourceUsage().maxRSS * 1024, ...anon(), stats: backend.stats(), cpuS: (u.user + u.system) / 1e6 };
    process.send!(m);
  });
  // Binding-only ceiling: receive rendezvous messages into one registered buffer, no file, no digest.
  const addon = loadUcx().addon!;
  const w = new addon.Worker({}, 'bench-raw');
  w.setSpin(Number(process.env.DYAD_BENCH_SPIN_US ?? 0));
  const scratch = Buffer.allocUnsafeSlow(64 << 20);
  const region = w.register(scratch);
  w.setAmHandler(RAW_AM, (_h, length, desc) => {
    if (desc) void w.amRecv(desc, scratch.subarray(0, length), region);
  });
  const ready: Ready = { ucx: ucx.address, tcp: tcp.address, raw: w.address().toString('base64') };
  process.send!(ready);
  process.on('disconnect', () => process.exit(0));
}

function settle(dir: string, prefaultBytes: number): void {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  execSync('sync');
  if (prefaultBytes > 0) {
    execSync(`${JSON.stringify(process.execPath)} -e "const n=${prefaultBytes}, c=1<<30; for (let o=0; o<n; o+=c) Buffer.alloc(Math.min(c, n-o), 1)"`);
  }
}

function pct(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))]!;
}

/** Sends `total` bytes as `msg`-byte rendezvous active messages, `window` in flight; GB/s. */
async function rawBinding(peer: string, total: number, msg: number, window: number): Promise<number> {
  const addon = loadUcx().addon!;
  const w = new addon.Worker({}, 'bench-raw-send');
  w.setSpin(Number(process.env.DYAD_BENCH_SPIN_US ?? 0));
  const ep = w.connect(Buffer.from(peer, 'base64'), () => {});
  const bufs = Array.from({ length: window }, () => {
    const buf = Buffer.alloc(msg, 7);
    return { buf, region: w.register(buf) };
  });
  const header = Buffer.alloc(16);
  // Wire-up and first-touch outside the timing.
  await ep.amSend(RAW_AM, header, bufs[0]!.buf, addon.amFlags.rndv, bufs[0]!.region);
  const t0 = process.hrtime.bigint();
  let sent = 0;
  await new Promise<void>((resolve, reject) => {
    let inflight = 0;
    const pump = (): void => {
      while (bufs.length > 0 && sent < total) {
        const b = bufs.pop()!;
        sent += msg;
        inflight++;
        ep.amSend(RAW_AM, header, b.buf, addon.amFlags.rndv, b.region).then(() => {
          bufs.push(b);
          if (--inflight === 0 && sent >= total) resolve();
          else pump();
        }, reject);
      }
    };
    pump();
  });
  const g = total / (Number(process.hrtime.bigint() - t0) / 1e9) / 1e9;
  await ep.close(false);
  w.close();
  return g;
}

function zeroDigest(size: number): string {
  const z = Buffer.alloc(1 << 20);
  const d = new Digester();
  for (let o = 0; o < size; o += z.length) d.update(z.subarray(0, Math.min(z.length, size - o)));
  return d.digest();
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      dir: { type: 'string' },
      rounds: { type: 'string', default: '3' },
      files: { type: 'string', default: '16' },
      mib: { type: 'string', default: '64' },
      small: { type: 'string', default: '1000' },
      tls: { type: 'string', default: 'tcp' },
      devices: { type: 'string', default: 'lo' },
      'chunk-kib': { type: 'string', default: '512' },
      window: { type: 'string', default: '8' },
      buffers: { type: 'string', default: '10' },
      'write-mode': { type: 'string', default: 'adaptive' },
      'read-mode': { type: 'string', default: 'adaptive' },
      paths: { type: 'string', default: 'am,get,tcp' },
      'huge-mib': { type: 'string', default: '1024' },
      perftest: { type: 'boolean', default: true },
      prefault: { type: 'boolean', default: true },
      bulk: { type: 'string', default: '2' },
      'receive-thread': { type: 'boolean', default: true },
    },
    allowNegative: true,
  });
  // Both processes (and perftest) see the same UCX configuration.
  process.env.UCX_TLS = values.tls;
  if (values.devices) process.env.UCX_NET_DEVICES = values.devices;
  const base = values.dir ?? mkdtempSync(join(tmpdir(), 'dyad-bench-ucx-'));
  const root = join(base, 'root');
  const out = join(base, 'out');
  const nBig = Number(values.files);
  const bigBytes = Number(values.mib) << 20;
  const nSmall = Number(values.small);
  const chunkBytes = Number(values['chunk-kib']) << 10;
  const paths = values.paths.split(',');
  mkdirSync(root, { recursive: true });

  const big: PullRequest[] = [];
  const seed = randomBytes(bigBytes);
  for (let i = 0; i < nBig; i++) {
    seed.writeUInt32LE(i, 0);
    writeFileSync(join(root, `big${i}`), seed);
    big.push({ upath: `big${i}`, size: bigBytes, digest: digestBuffer(seed) });
  }
  const smallBuf = randomBytes(4096);
  const small: PullRequest = { upath: 'small', size: 4096, digest: digestBuffer(smallBuf) };
  writeFileSync(join(root, 'small'), smallBuf);
  const hugeBytes = Number(values['huge-mib']) << 20;
  if (hugeBytes > 0) {
    writeFileSync(join(root, 'huge'), '');
    truncateSync(join(root, 'huge'), hugeBytes);
  }
  execSync('sync');

  const proc = fork(fileURLToPath(import.meta.url), ['--child', root, String(chunkBytes), values.window, values['read-mode']], { stdio: 'inherit' });
  const ready = await new Promise<Ready>((r) => proc.once('message', (m) => r(m as Ready)));
  const ownerMem = (): Promise<Mem> =>
    new Promise((r) => {
      proc.once('message', (m) => r(m as Mem));
      proc.send('mem');
    });
  const ucx = createUcxBackend({ spinUs: Number(process.env.DYAD_BENCH_SPIN_US ?? 0) });
  const clients = new Map<string, { client: TransferClient; address: string }>();
  for (const p of paths) {
    if (p === 'tcp') clients.set(p, { client: tcpBackend.client({ secret: SECRET }), address: ready.tcp });
    else {
      const client = ucx.client({
        secret: SECRET,
        dataPath: p as UcxDataPath,
        buffersPerPull: Number(values.buffers),
        writeMode: values['write-mode'] as IoMode,
        maxBulkPerPeer: Number(values.bulk),
        receiveThread: values['receive-thread'],
      });
      clients.set(p, { client, address: ready.ucx });
    }
  }
  const total = nBig * bigBytes;
  console.log(
    `# ${nBig} x ${values.mib} MiB; UCX_TLS=${values.tls} UCX_NET_DEVICES=${values.devices}; chunk ${values['chunk-kib']} KiB, window ${values.window}, ${values.buffers} buffers per pull; UCX pulls per owner ${values.bulk === '0' ? 'unlimited' : values.bulk}; receive thread ${values['receive-thread'] ? 'on' : 'off'}; ${values.prefault ? 'prefaulted' : 'cold memory'}`,
  );
  const gbps = (secs: number, bytes = total): number => bytes / secs / 1e9;
  const results = new Map<string, number[]>();
  const perf: number[] = [];
  const raw: number[] = [];
  const ratios = new Map<string, number[]>();
  for (let r = 0; r < Number(values.rounds); r++) {
    const line: string[] = [];
    if (values.perftest) {
      const g = await ucxPerftest(withUcxDefaults(process.env), 2000);
      perf.push(g);
      line.push(`perftest tag_bw ${g.toFixed(2)}`);
      const b = await rawBinding(ready.raw, 2000 << 20, 1 << 20, 8);
      raw.push(b);
      line.push(`binding am_bw ${b.toFixed(2)}`);
    }
    for (const [p, c] of clients) {
      settle(out, values.prefault ? Math.round(total * 1.5) : 0);
      const cpu0 = mainThreadCpu();
      const all0 = process.cpuUsage();
      const owner0 = (await ownerMem()).cpuS;
      const t0 = process.hrtime.bigint();
      await Promise.all(big.map((req, i) => c.client.pull(c.address, req, join(out, `big${i}`))));
      const g = gbps(Number(process.hrtime.bigint() - t0) / 1e9);
      const cpuPerGiB = (mainThreadCpu() - cpu0) / (total / 2 ** 30);
      const all = process.cpuUsage(all0);
      const allPerGiB = (all.user + all.system) / 1e6 / (total / 2 ** 30);
      const ownerPerGiB = ((await ownerMem()).cpuS - owner0) / (total / 2 ** 30);
      results.set(p, [...(results.get(p) ?? []), g]);
      line.push(`${p} ${g.toFixed(2)} (CPU s/GiB: consumer main thread ${cpuPerGiB.toFixed(2)}, consumer ${allPerGiB.toFixed(2)}, owner ${ownerPerGiB.toFixed(2)})`);
    }
    // Neighbours on a shared VM move every figure; ratios within a round move less.
    const tcpNow = results.get('tcp')?.[r];
    for (const p of clients.keys()) {
      if (p === 'tcp' || tcpNow === undefined) continue;
      ratios.set(p, [...(ratios.get(p) ?? []), results.get(p)![r]! / tcpNow]);
    }
    console.log(`round ${r}: GB/s ${line.join(', ')}`);
  }
  const mStats = await ownerMem();
  console.log(`owner worker ${JSON.stringify(mStats.stats)}; consumer worker ${JSON.stringify(ucx.stats())}`);
  const med = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  const summary = [...results].map(([p, xs]) => `${p} ${med(xs).toFixed(2)}`);
  if (perf.length) summary.unshift(`perftest tag_bw ${med(perf).toFixed(2)}`, `binding am_bw ${med(raw).toFixed(2)}`);
  console.log(`median GB/s: ${summary.join(', ')}`);
  for (const [p, xs] of ratios) console.log(`${p} / tcp per round: ${xs.map((x) => x.toFixed(2)).join(' ')} (median ${med(xs).toFixed(2)})`);
  if (perf.length) {
    console.log(`binding am_bw / perftest tag_bw = ${(med(raw) / med(perf)).toFixed(2)}`);
    if (results.has('am')) console.log(`am pull / perftest tag_bw = ${(med(results.get('am')!) / med(perf)).toFixed(2)}`);
  }

  // Whichever path ran first here used to come out 40-80 us slower (code
  // compiled on first use, caches): every path is warmed up first, and the
  // rounds alternate the order.
  const smallPaths = nSmall > 0 ? [...clients].filter(([p]) => p !== 'get') : []; // small files never reach the data path
  const smallLats = new Map<string, string[]>();
  for (const [, c] of smallPaths) {
    for (let i = 0; i < nSmall; i++) await c.client.pull(c.address, small, join(out, `w${i % 100}`));
  }
  for (let r = 0; r < Number(values.rounds); r++) {
    for (const [p, c] of r % 2 === 0 ? smallPaths : [...smallPaths].reverse()) {
      settle(out, values.prefault ? nSmall * 8192 : 0);
      const lat: number[] = [];
      for (let i = 0; i < nSmall; i++) {
        const t = process.hrtime.bigint();
        await c.client.pull(c.address, small, join(out, `s${i}`));
        lat.push(Number(process.hrtime.bigint() - t) / 1e3);
      }
      lat.sort((a, b) => a - b);
      smallLats.set(p, [...(smallLats.get(p) ?? []), `median ${pct(lat, 0.5).toFixed(0)} us p99 ${pct(lat, 0.99).toFixed(0)} us`]);
    }
  }
  for (const [p, lats] of smallLats) console.log(`${p}: ${nSmall} x 4 KiB sequential, after as many unmeasured: ${lats.join('; ')}`);

  const m0 = await ownerMem();
  if (hugeBytes > 0) {
    for (const [p, c] of clients) {
      if (p === 'tcp') continue;
      settle(out, 0);
      const t0 = process.hrtime.bigint();
      await c.client.pull(c.address, { upath: 'huge', size: hugeBytes, digest: zeroDigest(hugeBytes) }, join(out, 'huge'));
      const g = gbps(Number(process.hrtime.bigint() - t0) / 1e9, hugeBytes);
      const m = await ownerMem();
      console.log(`${p}: 1 x ${values['huge-mib']} MiB: ${g.toFixed(2)} GB/s; owner peak RSS ${(m.maxRss / 2 ** 20).toFixed(0)} MiB (was ${(m0.maxRss / 2 ** 20).toFixed(0)} MiB after the ${values.mib} MiB files)`);
    }
  }
  console.log(`consumer peak RSS ${((process.resourceUsage().maxRSS * 1024) / 2 ** 20).toFixed(0)} MiB`);
  for (const c of clients.values()) await c.client.close();
  proc.disconnect();
  if (!values.dir) rmSync(base, { recursive: true, force: true });
}

if (process.argv[2] === '--child') {
  await child(process.argv[3]!, Number(process.argv[4]), Number(process.argv[5]), process.argv[6] as IoMode);
} else {
  await main();
}
