/**
 * npm run bench -- kvs [--n N] [--backend embedded|etcd] (once registered in run.ts):
 * the embedded KVS over loopback, or with --backend etcd the etcd backend against
 * a local etcd (Debian's /usr/bin/etcd, data on the local disk) with the same
 * measurements.
 *
 * The server runs in a child process (its own event loop, as in production)
 * with a data directory on the local disk. Measured from this process:
 * sequential publish latency with and without fdatasync, lookup latency,
 * wait wake-up latency (a second connection is blocked in wait(); the time runs
 * from the publish call to the waiter's resolution), and publish throughput
 * with 64 in flight. The baseline for the round trips is the protocol's ping.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { EmbeddedKvsClient, EtcdKvs, type Kvs, type PublishInput } from '../src/kvs/index.js';
import { startEtcd } from '../test/helpers/etcd.js';
import { median, percentile, printTable, repoRoot, type Row } from './lib.js';

const rec: PublishInput = { owner: 0, size: 4096, mode: 0o100644, mtimeMs: 0, digest: 'sha256:0' };

async function serve(dataDir: string, fsync: boolean): Promise<{ url: string; secret: string; stop(): Promise<void> }> {
  const mod = path.join(repoRoot, 'dist', 'src', 'kvs', 'index.js');
  const child = spawn(
    process.execPath,
    [
      '--input-type=module',
      '-e',
      `const { startKvsServer } = await import(${JSON.stringify(mod)});
       const s = await startKvsServer({ dataDir: ${JSON.stringify(dataDir)}, fsync: ${fsync} });
       const secret = await s.createNamespace('bench');
       console.log(JSON.stringify({ url: s.url, secret }));
       process.on('SIGTERM', async () => { await s.close(); process.exit(0); });`,
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const line = await new Promise<string>((resolve) => createInterface({ input: child.stdout! }).once('line', resolve));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  return {
    ...(JSON.parse(line) as { url: string; secret: string }),
    stop: async () => {
      child.kill('SIGTERM');
      await exited;
    },
  };
}

async function timeEach(n: number, fn: (i: number) => Promise<unknown>): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    await fn(i);
    out.push((performance.now() - t0) * 1000);
  }
  return out;
}

/** Lookup, wake-up and 64-in-flight rows shared by both backends. */
async function measure(rows: Row[], n: number, producer: Kvs, consumer: Kvs, ns: string, ping: number[], tag: string): Promise<void> {
  const look = await timeEach(n, (i) => producer.lookup(ns, `seq/${i}`));
  rows.push({ what: 'lookup, 1 in flight, median', value: median(look), unit: 'µs', baseline: { name: 'ping', value: median(ping) }, better: 'lower' });
  const wake: number[] = [];
  for (let i = 0; i < n; i++) {
    const w = consumer.wait(ns, `wake/${i}`);
    await consumer.lookup(ns, 'warm'); // the wait is armed on the server
    const t0 = performance.now();
    void producer.publish(ns, `wake/${i}`, rec);
    await w;
    wake.push((performance.now() - t0) * 1000);
  }
  rows.push({ what: 'wait wake-up after publish, median', value: median(wake), unit: 'µs', baseline: { name: 'ping', value: median(ping) }, better: 'lower' });
  rows.push({ what: 'wait wake-up after publish, p99', value: percentile(wake, 99), unit: 'µs', better: 'lower' });
  const total = n * 5;
  let next = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: 64 }, async () => {
      while (next < total) await producer.publish(ns, `par/${next++}`, rec);
    }),
  );
  rows.push({ what: `publish throughput, 64 in flight (${tag})`, value: total / ((performance.now() - t0) / 1000), unit: 'ops/s', better: 'higher' });
}

async function benchEtcd(n: number): Promise<void> {
  const rows: Row[] = [];
  const etcd = await startEtcd({ dataParent: os.tmpdir() });
  const producer = await EtcdKvs.connect(etcd.url('/bench'), { env: {} });
  const consumer = await EtcdKvs.connect(etcd.url('/bench'), { env: {} });
  try {
    await producer.createNamespace('bench');
    await producer.lookup('bench', 'warm');
    await consumer.lookup('bench', 'warm');
    const ping = await timeEach(n, () => producer.hasNamespace('bench'));
    const pub = await timeEach(n, (i) => producer.publish('bench', `seq/${i}`, rec));
    rows.push({ what: 'publish, 1 in flight (etcd WAL fsync), median', value: median(pub), unit: 'µs', baseline: { name: 'ping', value: median(ping) }, better: 'lower' });
    rows.push({ what: 'publish, 1 in flight (etcd WAL fsync), p99', value: percentile(pub, 99), unit: 'µs', better: 'lower' });
    const fresh = await timeEach(Math.min(n, 500), (i) => producer.publish('bench', `dirs/d${i}/f`, rec));
    rows.push({ what: 'publish creating a directory, median', value: median(fresh), unit: 'µs', better: 'lower' });
    await measure(rows, n, producer, consumer, 'bench', ping, 'etcd WAL fsync');
  } finally {
    await producer.close();
    await consumer.close();
    await etcd.destroy();
  }
  printTable(`etcd backend, local etcd ${etcd.endpoint} (${n} operations each; ping = a count-only range)`, rows);
}

export async function main(args: string[]): Promise<void> {
  const nArg = args.indexOf('--n');
  const n = nArg >= 0 ? Number(args[nArg + 1]) : 2000;
  const bArg = args.indexOf('--backend');
  const backend = bArg >= 0 ? args[bArg + 1] : 'embedded';
  if (backend === 'etcd') return benchEtcd(n);
  if (backend !== 'embedded') throw new Error(`--backend ${String(backend)}: expected embedded or etcd`);
  const rows: Row[] = [];
  const base = fs.mkdtempSync(path.join(os.tmpdir(), 'dyadfs-bench-kvs-'));
  try {
    for (const fsync of [true, false]) {
      const dataDir = path.join(base, fsync ? 'fsync' : 'nofsync');
      const srv = await serve(dataDir, fsync);
      const producer = await EmbeddedKvsClient.connect(srv.url, { secret: srv.secret, env: {} });
      const consumer = await EmbeddedKvsClient.connect(srv.url, { secret: srv.secret, env: {} });
      try {
        await producer.lookup('bench', 'warm');
        await consumer.lookup('bench', 'warm');
        const ping = await timeEach(n, () => producer.hasNamespace('bench'));
        const tag = fsync ? 'fdatasync' : 'no fsync';
        const pub = await timeEach(n, (i) => producer.publish('bench', `seq/${i}`, rec));
        rows.push({ what: `publish, 1 in flight (${tag}), median`, value: median(pub), unit: 'µs', baseline: { name: 'ping', value: median(ping) }, better: 'lower' });
        rows.push({ what: `publish, 1 in flight (${tag}), p99`, value: percentile(pub, 99), unit: 'µs', better: 'lower' });
        if (!fsync) continue;
        await measure(rows, n, producer, consumer, 'bench', ping, 'fdatasync');
      } finally {
        await producer.close();
        await consumer.close();
        await srv.stop();
      }
    }
  } finally {
    fs.rmSync(base, { recursive: true, force: true });
  }
  printTable(`embedded KVS over loopback (${n} operations each)`, rows);
}
