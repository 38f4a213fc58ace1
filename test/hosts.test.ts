/**
 * Many nodes, simulated: test hosts in network namespaces, one daemon each,
 * talking over veth links and a bridge. All-to-all exchange; a host killed
 * during pulls; a daemon restart that republishes its storage.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { netCluster, network } from './helpers/netns.js';
import { etcdUnavailable, startEtcd } from './helpers/etcd.js';
import { dyadBin, exec } from './helpers/mount.js';
import { sh } from './helpers/mount.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const content = (from: number, to: number) => `from host ${from} for host ${to}\n`.repeat(100 + from * 10 + to);

t.test('all-to-all exchange over 8 hosts', async (t) => {
  const c = await netCluster(t, 8);
  t.match(fs.readFileSync(c.nodes[1]!.log, 'utf8'), new RegExp(`transfer service at ${c.net.hosts[1]!.addr.replace(/\./g, '\\.')}:`), 'each host serves on its own address');
  // Consumers first: every host starts reading what every other host will write.
  const readers = c.nodes.map((n) =>
    sh(
      c.nodes
        .filter((o) => o !== n)
        .map((o) => `cat ${path.join(n.mnt, 'x', `${o.rank}-to-${n.rank}`)} > ${path.join(c.base, `got-${o.rank}-${n.rank}`)}`)
        .join(' && '),
      { timeoutMs: 120_000 },
    ),
  );
  await sleep(300);
  await Promise.all(
    c.nodes.map(async (n) => {
      fs.mkdirSync(path.join(n.mnt, 'x'), { recursive: true });
      for (const o of c.nodes) if (o !== n) fs.writeFileSync(path.join(n.mnt, 'x', `${n.rank}-to-${o.rank}`), content(n.rank, o.rank));
    }),
  );
  const results = await Promise.all(readers);
  t.ok(results.every((r) => r.code === 0), `all readers finished: ${results.map((r) => r.stderr).join('')}`);
  let ok = 0;
  for (const n of c.nodes) for (const o of c.nodes) if (o !== n && fs.readFileSync(path.join(c.base, `got-${o.rank}-${n.rank}`), 'utf8') === content(o.rank, n.rank)) ok++;
  t.equal(ok, 8 * 7, 'every one of the 56 files arrived intact');
  const local = fs.readdirSync(path.join(c.nodes[3]!.storage, 'x')).sort();
  t.equal(local.filter((f) => f.endsWith('-to-3')).length, 7, 'pulled files sit in the consumer\'s storage');
  t.equal(local.filter((f) => f.startsWith('.dyad-part')).length, 0, 'no temporary files');
});

t.test('a host killed during pulls: errors, no partial files', async (t) => {
  const c = await netCluster(t, 3, { args: ['--peer-timeout', '2'] });
  const [, owner, cons] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0], (typeof c.nodes)[0]];
  // Files large enough that pulls are in flight when the owner dies.
  for (let i = 0; i < 6; i++) fs.writeFileSync(path.join(owner.mnt, `big${i}`), Buffer.alloc(48 << 20, i));
  const pulls = Array.from({ length: 6 }, (_, i) => sh(`cat ${path.join(cons.mnt, `big${i}`)} | wc -c`, { timeoutMs: 120_000 }));
  // Kill it once a pull is under way (its temporary file exists): a fixed
  // delay was sometimes too late, and then nothing failed at all.
  const underWay = () => fs.readdirSync(cons.storage).some((f) => f.startsWith('.dyad-part'));
  for (let i = 0; i < 20_000 && !underWay(); i++) await sleep(1);
  t.ok(underWay(), 'a pull was under way when the owner was killed');
  process.kill(owner.pid, 'SIGKILL');
  const results = await Promise.all(pulls);
  const eio = (r: { stdout: string; stderr: string }) => Number(r.stdout.trim()) === 0 && /Input\/output error/.test(r.stderr);
  for (const [i, r] of results.entries()) {
    const got = Number(r.stdout.trim());
    t.ok(got === 48 << 20 || eio(r), `big${i}: whole file or EIO (${got} bytes, ${r.stderr.trim()})`);
  }
  t.ok(results.some(eio), 'the pulls the owner did not finish failed with EIO');
  const left = fs.readdirSync(cons.storage);
  t.equal(left.filter((f) => f.startsWith('.dyad-part')).length, 0, 'no temporary files left');
  for (let i = 0; i < 6; i++) {
    const size = left.includes(`big${i}`) ? fs.statSync(path.join(cons.storage, `big${i}`)).size : null;
    t.ok(size === null || size === 48 << 20, `big${i} in storage is whole or absent (${size ?? 'absent'})`);
  }
});

t.test('a restarted daemon republishes what its storage holds', async (t) => {
  const c = await netCluster(t, 2);
  const [, p] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  fs.writeFileSync(path.join(p.storage, 'preexisting.txt'), 'was in storage before the daemon started');
  fs.mkdirSync(path.join(p.storage, 'd'));
  fs.writeFileSync(path.join(p.storage, 'd', 'nested.txt'), 'nested');
  // Restart the daemon of host 1 over the same storage.
  await p.umount();
  const { mountCli } = await import('./helpers/mount.js');
  await mountCli(t, p.mnt, ['--kvs', c.kvsUrl, '--secret-file', c.secretFile, '--rank', '1', '--listen', `${p.host.addr}:0`, '--storage', p.storage], p.host.enter);
  const q = c.nodes[0]!;
  const r = await sh(`cat ${path.join(q.mnt, 'preexisting.txt')} ${path.join(q.mnt, 'd', 'nested.txt')}`, { timeoutMs: 30_000 });
  t.equal(r.stdout, 'was in storage before the daemon startednested', r.stderr);
});

t.test('when the owner is gone, a copy pulled by another node is used', async (t) => {
  const c = await netCluster(t, 4, { args: ['--peer-timeout', '2'] });
  const [, owner, first, second] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0], (typeof c.nodes)[0], (typeof c.nodes)[0]];
  fs.writeFileSync(path.join(owner.mnt, 'data.bin'), Buffer.alloc(1 << 20, 9));
  const a = await sh(`md5sum < ${path.join(first.mnt, 'data.bin')}`, { timeoutMs: 30_000 });
  t.equal(a.code, 0, a.stderr);
  await sleep(300); // the copy's record is written in the background
  process.kill(owner.pid, 'SIGKILL');
  const b = await sh(`md5sum < ${path.join(second.mnt, 'data.bin')}`, { timeoutMs: 60_000 });
  t.equal(b.code, 0, b.stderr);
  t.equal(b.stdout, a.stdout, 'the second reader got the same bytes from the first one\'s copy');
  t.match(fs.readFileSync(second.log, 'utf8'), /pulled data\.bin from rank 2's copy \(owner rank 1 failed\)/);
  t.notOk(fs.readdirSync(second.mnt).includes('.dyad-replicas'), 'copy records are not listed');
});

t.test('etcd across hosts: restart loses no publication, waits resume', { skip: etcdUnavailable() ?? false }, async (t) => {
  const net = network(t, 3);
  const etcd = await startEtcd({ host: net.hosts[0]!.addr, enter: net.hosts[0]!.enter });
  t.teardown(() => etcd.destroy());
  const url = etcd.url();
  const argv = [...net.hosts[0]!.enter, process.execPath, dyadBin, 'namespace', 'create', 'dyad', '--kvs', url];
  await exec(argv[0]!, argv.slice(1));
  const c = await netCluster(t, 3, { kvs: url, net });
  const [, p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0], (typeof c.nodes)[0]];
  fs.writeFileSync(path.join(p.mnt, 'early.txt'), 'before the restart');
  const waiting = sh(`cat ${path.join(q.mnt, 'late.txt')}`, { timeoutMs: 90_000 });
  await sleep(500);
  await etcd.stop('SIGKILL');
  await etcd.start();
  fs.writeFileSync(path.join(p.mnt, 'late.txt'), 'after the restart');
  const r = await waiting;
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stdout, 'after the restart', 'the wait resumed and saw the publication');
  t.equal(fs.readFileSync(path.join(q.mnt, 'early.txt'), 'utf8'), 'before the restart', 'no publication lost');
});
