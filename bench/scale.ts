/**
 * npm run bench -- scale [--quick] [--hosts 2,4,8] [--kvs embedded,etcd] [--dtl tcp,ucx]:
 * all-to-all exchange between 2, 4 and 8 test hosts (network namespaces on
 * this machine, see test/helpers/netns.ts), with the embedded KVS and with
 * etcd. Every host produces `small` files of 4 KiB and `big` files of 64 MiB,
 * then consumes as many, spread evenly over all the other hosts, all hosts at
 * once. Prints aggregate and per-host throughput, per-file latencies, and how
 * they change with the host count. --dtl ucx runs the daemons with
 * --dtl UCX, forced onto each host's veth (UCX_TLS=tcp, UCX_NET_DEVICES=eth0:
 * otherwise UCX would use shared memory between namespaces).
 *
 * The hosts share this machine's 2 CPUs: aggregate throughput cannot grow
 * with the host count here, so per-host figures fall as hosts are added.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { close, compile, median, onHost, prefault, printTable, repoRoot, scope, type Row } from './lib.js';
import { netCluster, network, type NetCluster } from '../test/helpers/netns.js';
import { startEtcd } from '../test/helpers/etcd.js';

function runIn(enter: string[], cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const p = spawn(...onHost(enter, cmd, args), { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d: Buffer) => (out += d));
    p.stderr.on('data', (d: Buffer) => (err += d));
    p.on('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`${cmd} ${args.join(' ')}: ${err}`))));
  });
}

interface Result {
  hosts: number;
  kvs: string;
  dtl: string;
  publishMedianMs: number;
  smallMedianMs: number;
  smallP99Ms: number;
  aggregateGBps: number;
  perHostGBps: number;
  wallS: number;
}

async function round(hosts: number, kvs: string, dtl: string, small: number, big: number, files: string): Promise<Result> {
  const t = scope();
  const args = dtl === 'ucx' ? ['--dtl', 'UCX'] : [];
  if (dtl === 'ucx') {
    // The daemons inherit these (mountCli passes the environment on).
    process.env.UCX_TLS = 'tcp';
    process.env.UCX_NET_DEVICES = 'eth0';
  } else if (dtl !== 'tcp') {
    throw new Error(`--dtl ${dtl}: expected tcp or ucx`);
  }
  try {
    let c: NetCluster;
    if (kvs === 'etcd') {
      // etcd beside the job, on host 0, data on the same disk as the storage.
      const net = network(t, hosts);
      const etcd = await startEtcd({ host: net.hosts[0]!.addr, enter: net.hosts[0]!.enter, dataParent: os.tmpdir() });
      t.teardown(() => etcd.destroy());
      await runIn(net.hosts[0]!.enter, process.execPath, [path.join(repoRoot, 'bin', 'dyad.js'), 'namespace', 'create', 'dyad', '--kvs', etcd.url()]);
      c = await netCluster(t, hosts, { kvs: etcd.url(), net, args });
    } else if (kvs === 'embedded') {
      c = await netCluster(t, hosts, { args });
    } else {
      throw new Error(`--kvs ${kvs}: expected embedded or etcd`);
    }
    // Produce: small files, then big ones, on every host at once.
    const prod = await Promise.all(
      c.nodes.map(async (n) => {
        fs.mkdirSync(path.join(n.mnt, `p${n.rank}`));
        const s = (await runIn([], files, ['write', path.join(n.mnt, `p${n.rank}`), 's', String(small), '4096'])).trim().split(/\s+/).map(Number);
        await runIn([], files, ['write', path.join(n.mnt, `p${n.rank}`), 'b', String(big), String(64 << 20)]);
        return s[2]! / 1000; // median ms per small file
      }),
    );
    // Consume: host r reads the files j of host o with (o + 1 + j % (H-1)) % H === r.
    const lists = c.nodes.map((n) => {
      const smallPaths: string[] = [];
      const bigPaths: string[] = [];
      for (const o of c.nodes) {
        if (o === n) continue;
        for (let j = 0; j < small; j++) if ((o.rank + 1 + (j % (hosts - 1))) % hosts === n.rank) smallPaths.push(path.join(n.mnt, `p${o.rank}`, `s${j}`));
        for (let j = 0; j < big; j++) if ((o.rank + 1 + (j % (hosts - 1))) % hosts === n.rank) bigPaths.push(path.join(n.mnt, `p${o.rank}`, `b${j}`));
      }
      const dir = path.join(c.base, `lists`);
      fs.mkdirSync(dir, { recursive: true });
      const sl = path.join(dir, `small-${n.rank}`);
      const bl = path.join(dir, `big-${n.rank}`);
      fs.writeFileSync(sl, smallPaths.join('\n'));
      fs.writeFileSync(bl, bigPaths.join('\n'));
      return { sl, bl, count: smallPaths.length, bigBytes: bigPaths.length * (64 << 20) };
    });
    const reader = path.join(repoRoot, 'dist', 'bench', 'readlist.js');
    const none = path.join(c.base, 'lists', 'none');
    fs.writeFileSync(none, '');
    // Phase 1, small files on every host at once (latency); phase 2, big ones (throughput).
    const small1 = await Promise.all(lists.map((l) => runIn([], process.execPath, [reader, l.sl, none])));
    prefault(hosts * big * 64 * 2);
    const t0 = process.hrtime.bigint();
    await Promise.all(lists.map((l) => runIn([], process.execPath, [reader, none, l.bl])));
    const wallS = Number(process.hrtime.bigint() - t0) / 1e9;
    const per = small1.map((o) => JSON.parse(o) as { smallMedianMs: number; smallP99Ms: number });
    const bytes = lists.reduce((a, l) => a + l.bigBytes, 0);
    return {
      hosts,
      kvs,
      dtl,
      publishMedianMs: median(prod),
      smallMedianMs: median(per.map((p) => p.smallMedianMs)),
      smallP99Ms: Math.max(...per.map((p) => p.smallP99Ms)),
      aggregateGBps: bytes / wallS / 1e9,
      perHostGBps: bytes / wallS / 1e9 / hosts,
      wallS,
    };
  } finally {
    await close(t);
  }
}

export async function main(args: string[]): Promise<void> {
  const quick = args.includes('--quick');
  const opt = (name: string, dflt: string) => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1]! : dflt;
  };
  const hostCounts = opt('--hosts', '2,4,8').split(',').map(Number);
  const kvsList = opt('--kvs', 'embedded,etcd').split(',');
  const dtlList = opt('--dtl', 'tcp').split(',');
  const small = quick ? 200 : 1000;
  const big = quick ? 4 : 16;
  if (process.getuid?.() !== 0) throw new Error('the scale benchmark creates network namespaces: run it as root');
  const files = compile('files');
  console.log(`# dyad-fs scale benchmark: per host ${small} × 4 KiB and ${big} × 64 MiB, all-to-all, hosts ${hostCounts.join('/')}`);
  console.log(`# ${os.cpus().length} CPUs shared by every test host, kernel ${os.release()}`);
  const results: Result[] = [];
  const combos = dtlList.flatMap((dtl) => kvsList.map((kvs) => ({ dtl, kvs })));
  for (const { dtl, kvs } of combos) {
    for (const h of hostCounts) {
      const r = await round(h, kvs, dtl, small, big, files);
      results.push(r);
      console.log(`# ${dtl} ${kvs} ${h} hosts: aggregate ${r.aggregateGBps.toFixed(2)} GB/s, per host ${r.perHostGBps.toFixed(3)} GB/s, small median ${r.smallMedianMs.toFixed(2)} ms (p99 ${r.smallP99Ms.toFixed(2)}), publish median ${r.publishMedianMs.toFixed(2)} ms, ${r.wallS.toFixed(1)} s`);
      spawnSync('sync');
    }
  }
  for (const { dtl, kvs } of combos) {
    const rs = results.filter((r) => r.kvs === kvs && r.dtl === dtl);
    const two = rs.find((r) => r.hosts === Math.min(...hostCounts))!;
    const rows: Row[] = [];
    for (const r of rs) {
      rows.push({ what: `${r.hosts} hosts: aggregate throughput (64 MiB files)`, value: r.aggregateGBps, unit: 'GB/s', baseline: { name: `${two.hosts} hosts`, value: two.aggregateGBps }, better: 'higher' });
      rows.push({ what: `${r.hosts} hosts: per-host throughput (64 MiB files)`, value: r.perHostGBps, unit: 'GB/s', baseline: { name: `${two.hosts} hosts`, value: two.perHostGBps }, better: 'higher', target: r.hosts === 8 ? '≥ 0.7× 2 hosts' : '' });
      rows.push({ what: `${r.hosts} hosts: remote 4 KiB open, median`, value: r.smallMedianMs, unit: 'ms', baseline: { name: `${two.hosts} hosts`, value: two.smallMedianMs }, better: 'lower', target: kvs === 'etcd' ? '≤ 3 ms' : '' });
      rows.push({ what: `${r.hosts} hosts: publish per 4 KiB file, median`, value: r.publishMedianMs, unit: 'ms', baseline: { name: `${two.hosts} hosts`, value: two.publishMedianMs }, better: 'lower', target: kvs === 'etcd' ? '≤ 2 ms' : '' });
    }
    printTable(`Scale, ${kvs} KVS, ${dtl.toUpperCase()} transfers`, rows);
  }
  fs.rmSync(path.join(os.tmpdir(), 'nothing'), { force: true });
}
