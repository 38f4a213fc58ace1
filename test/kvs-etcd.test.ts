/**
 * What only the etcd backend has to prove, against a real etcd: records live
 * at DYAD's keys; a pending wait survives an etcd crash and restart without
 * losing the publication, and a watch that can no longer resume (compacted
 * history) says so with a reset; a dead client's rank registration expires
 * with its lease; unreachable etcd fails with errors naming it; concurrent
 * clients keep the directory tree well formed.
 */
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { createServer } from 'node:net';
import { fileURLToPath } from 'node:url';
import { Etcd3 } from 'etcd3';
import t from 'tap';
import { errnos, type DyadError } from '../src/errors.js';
import {
  CachedKvs,
  EtcdKvs,
  genPathKey,
  openKvs,
  parseEtcdUrl,
  type DirEntry,
  type EtcdKvsOptions,
  type KvsWatchEvent,
  type PublishInput,
  type RankEvent,
} from '../src/kvs/index.js';
import { etcdUnavailable, startEtcd, startProxy, type EtcdServer } from './helpers/etcd.js';

const file = (owner = 1, size = 10): PublishInput => ({ owner, size, mode: 0o100644, mtimeMs: 1_700_000_000_000, digest: 'sha256:x' });

t.test('etcd URLs', async (t) => {
  t.same(parseEtcdUrl('etcd://h1'), { endpoints: ['h1:2379'], prefix: '/dyad' });
  t.same(parseEtcdUrl('etcd://h1:1,10.0.0.2:2,[::1]:3/a/b/'), { endpoints: ['h1:1', '10.0.0.2:2', '[::1]:3'], prefix: '/a/b' });
  t.same(parseEtcdUrl('etcd://h/'), { endpoints: ['h:2379'], prefix: '' });
  for (const bad of ['etcd://', 'etcd://h:99999', 'etcd://u:p@h', 'etcd://h,/x', 'etcds://h', 'etcd://h/a//b']) {
    t.throws(() => parseEtcdUrl(bad), { code: 'DYAD_ECONFIG' }, bad);
  }
});

const skip = etcdUnavailable();
if (skip !== undefined) {
  t.comment(`etcd tests skipped: ${skip}`);
} else {
  let prefixes = 0;
  const open = async (etcd: EtcdServer, prefix: string, opts: EtcdKvsOptions = {}): Promise<EtcdKvs> =>
    (await openKvs(etcd.url(prefix), { env: {}, ...opts })) as EtcdKvs;

  t.test('against a live etcd', async (t) => {
    const etcd = await startEtcd();
    t.teardown(() => etcd.destroy());
    const raw = new Etcd3({ hosts: `http://${etcd.endpoint}` });
    t.teardown(() => raw.close());

    t.test('records live at the DYAD key', async (t) => {
      const prefix = `/layout${++prefixes}`;
      const kvs = await open(etcd, prefix);
      t.teardown(() => kvs.close());
      await kvs.createNamespace('job');
      const rec = await kvs.publish('job', 'a/b/c.txt', file(3, 42));
      const dyadKey = genPathKey('a/b/c.txt');
      t.equal(dyadKey, '4d.13d.3f7.a/b/c.txt', 'default depth 3, bins 1024');
      const kv = (await raw.get(`${prefix}/ns/job/k/${dyadKey}`).exec()).kvs[0];
      t.ok(kv, 'file record at <prefix>/ns/<ns>/k/<DYAD key>');
      t.same(JSON.parse(kv!.value.toString()), { kind: 'file', owner: 3, size: 42, mode: 0o100644, mtimeMs: 1_700_000_000_000, digest: 'sha256:x' });
      t.equal(Number(kv!.mod_revision), rec.version, 'version = mod_revision');
      t.ok(await raw.get(`${prefix}/ns/job/e/a/b\0c.txt`).string(), 'directory entry');
      t.match(JSON.parse((await raw.get(`${prefix}/ns/job/e/a\0b`).string())!), { kind: 'dir', owner: -1 }, 'a directory record lives in its entry');
      t.match(JSON.parse((await raw.get(`${prefix}/ns/job/meta`).string())!), { secret: /^[0-9a-f]{64}$/, keyDepth: 3, keyBins: 1024 });
      t.equal(await raw.get(`${prefix}/nsidx/job`).string(), '', 'namespace index');
      t.match(await kvs.namespaceSecret('job'), /^[0-9a-f]{64}$/);

      // Key parameters belong to the namespace: a client configured differently follows them.
      await kvs.createNamespace('shallow');
      const creator = await open(etcd, prefix, { keyDepth: 1, keyBins: 16 });
      t.teardown(() => creator.close());
      await creator.createNamespace('custom');
      await creator.publish('custom', 'x/y', file());
      t.ok((await raw.get(`${prefix}/ns/custom/k/${genPathKey('x/y', 1, 16)}`).string()) !== null, 'depth 1, 16 bins');
      t.match(await kvs.lookup('custom', 'x/y'), { kind: 'file' }, 'another client finds it with the namespace parameters');
      await kvs.publish('custom', 'x/z', file());
      t.ok((await raw.get(`${prefix}/ns/custom/k/${genPathKey('x/z', 1, 16)}`).string()) !== null, 'and publishes with them');
      t.equal(await raw.get(`${prefix}/ns/custom/k/${genPathKey('x/z')}`).string(), null);

      const secret = 'ab'.repeat(32);
      const withSecret = await open(etcd, prefix, { secret });
      t.teardown(() => withSecret.close());
      await withSecret.createNamespace('given');
      t.equal(await kvs.namespaceSecret('given'), secret, 'a configured secret becomes the namespace secret');

      // One transaction per change bounds the depth (etcd --max-txn-ops, default 128).
      const deep = (n: number): string => Array.from({ length: n }, (_, i) => `d${i}`).join('/');
      t.match(await kvs.publish('job', deep(124), file()), { kind: 'file' }, '124 components');
      t.equal(await kvs.unpublish('job', deep(124)), true);
      t.equal(await kvs.lookup('job', 'd0'), undefined, 'the whole emptied chain went');
      await t.rejects(kvs.publish('job', deep(125), file()), { code: 'DYAD_EINVAL', message: /max-txn-ops/ });

      await kvs.removeNamespace('job');
      t.same((await raw.getAll().prefix(`${prefix}/ns/job/`).keys()).length, 0, 'removal clears the prefix');
      t.same(await kvs.listNamespaces(), ['custom', 'given', 'shallow']);
    });

    t.test('a pending wait survives an etcd crash and restart', async (t) => {
      const prefix = `/restart${++prefixes}`;
      // A slow watch reconnect, so the publication lands while A is still away.
      const a = await open(etcd, prefix, { reconnectMinMs: 800, reconnectMaxMs: 800 });
      const b = await open(etcd, prefix);
      t.teardown(() => Promise.all([a.close(), b.close()]));
      await b.createNamespace('r');
      const events: KvsWatchEvent[] = [];
      await a.watch('r', (ev) => events.push(ev));
      const before = await b.publish('r', 'before', file());
      const pending = a.wait('r', 'out/late', { timeoutMs: 15_000 });
      await a.lookup('r', 'out/late');
      await new Promise((r) => setTimeout(r, 50));

      await etcd.stop('SIGKILL');
      await etcd.start();
      const t0 = performance.now();
      const rec = await b.publish('r', 'out/late', file(7));
      const late = await pending;
      t.same(late, rec, 'the wait resolves with the publication made while it was disconnected');
      t.comment(`wait resolved ${(performance.now() - t0).toFixed(0)} ms after the post-restart publish`);
      const deadline = performance.now() + 5000;
      while (!events.some((e) => e.type === 'change' && e.rev === rec.version) && performance.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      t.same(
        events.map((e) => (e.type === 'change' ? e.rev : e.type)),
        [before.version, rec.version],
        'the watch resumed without a gap or a reset',
      );
    });

    t.test('a watch cut off resumes from the next revision, replaying what it missed', async (t) => {
      const prefix = `/resume${++prefixes}`;
      const proxy = await startProxy(etcd.endpoint);
      const a = (await openKvs(`etcd://${proxy.endpoint}${prefix}`, { env: {}, reconnectMinMs: 20, reconnectMaxMs: 100 })) as EtcdKvs;
      const b = await open(etcd, prefix);
      t.teardown(async () => {
        await Promise.all([a.close(), b.close()]);
        await proxy.close();
      });
      await b.createNamespace('m');
      const events: KvsWatchEvent[] = [];
      await a.watch('m', (ev) => events.push(ev));
      const pending = a.wait('m', 'd/late', { timeoutMs: 10_000 });
      await a.lookup('m', 'd/late');
      await new Promise((r) => setTimeout(r, 50));
      proxy.cut();
      // Published while A cannot hear anything; A keeps failing to reconnect meanwhile.
      const missed = [];
      for (let i = 0; i < 5; i++) missed.push(await b.publish('m', `d/f${i}`, file()));
      const rec = await b.publish('m', 'd/late', file(9));
      await new Promise((r) => setTimeout(r, 300));
      t.equal(events.length, 0, 'nothing arrived while cut off');
      proxy.restore();
      t.same(await pending, rec, 'the wait resolves from the replayed history');
      const deadline = performance.now() + 5000;
      while (!events.some((e) => e.type === 'change' && e.rev === rec.version) && performance.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      t.same(
        events.map((e) => (e.type === 'change' ? e.rev : e.type)),
        [...missed, rec].map((r) => r.version),
        'every missed revision, in order, no reset',
      );
    });

    t.test('a watch that cannot resume resets, and its waits still resolve', async (t) => {
      const prefix = `/compact${++prefixes}`;
      const proxy = await startProxy(etcd.endpoint);
      const a = (await openKvs(`etcd://${proxy.endpoint}${prefix}`, { env: {}, reconnectMinMs: 20, reconnectMaxMs: 100 })) as EtcdKvs;
      const b = await open(etcd, prefix);
      t.teardown(async () => {
        await Promise.all([a.close(), b.close()]);
        await proxy.close();
      });
      await b.createNamespace('c');
      const events: KvsWatchEvent[] = [];
      await a.watch('c', (ev) => events.push(ev));
      const pending = a.wait('c', 'target', { timeoutMs: 10_000 });
      await a.lookup('c', 'target');
      await new Promise((r) => setTimeout(r, 50));
      proxy.cut();
      const rec = await b.publish('c', 'target', file());
      const after = await b.publish('c', 'after', file());
      // The history A would resume from is gone.
      await raw.kv.compact({ revision: after.version, physical: true });
      proxy.restore();
      t.same(await pending, rec, 'the wait is answered by a fresh lookup');
      const until = async (ok: () => boolean): Promise<boolean> => {
        const deadline = performance.now() + 5000;
        while (!ok() && performance.now() < deadline) await new Promise((r) => setTimeout(r, 20));
        return ok();
      };
      t.ok(await until(() => events.some((e) => e.type === 'reset')), 'listeners are told to forget');
      t.notOk(events.some((e) => e.type === 'change' && e.rev === rec.version), 'the lost change is not invented');
      const next = await b.publish('c', 'next', file());
      t.ok(await until(() => events.some((e) => e.type === 'change' && e.rev === next.version)), 'and events flow again');
    });

    t.test('rank registrations expire with a dead client', async (t) => {
      const prefix = `/lease${++prefixes}`;
      const kvs = await open(etcd, prefix);
      t.teardown(() => kvs.close());
      await kvs.createNamespace('l');
      const seen: RankEvent[] = [];
      await kvs.watchRanks('l', (ev) => seen.push(ev));

      const mod = fileURLToPath(new URL('../src/kvs/index.js', import.meta.url));
      const child = spawn(
        process.execPath,
        [
          '--input-type=module',
          '-e',
          `const { openKvs } = await import(${JSON.stringify(mod)});
           const kvs = await openKvs(${JSON.stringify(etcd.url(prefix))}, { env: {}, rankLeaseTtlSec: 2 });
           await kvs.registerRank('l', { rank: 5, address: 'node5:7000' });
           console.log('ready');
           setInterval(() => {}, 1000);`,
        ],
        { stdio: ['ignore', 'pipe', 'inherit'] },
      );
      const exited = new Promise<void>((r) => child.once('exit', () => r()));
      t.teardown(() => {
        child.kill('SIGKILL');
        return exited;
      });
      await new Promise<void>((r) => createInterface({ input: child.stdout! }).once('line', () => r()));
      t.same(await kvs.lookupRank('l', 5), { rank: 5, address: 'node5:7000' });
      // Alive for longer than the TTL: the lease is being kept alive.
      await new Promise((r) => setTimeout(r, 2500));
      t.ok(await kvs.lookupRank('l', 5), 'still registered after one TTL while alive');
      child.kill('SIGKILL');
      await exited;
      const t0 = performance.now();
      while ((await kvs.lookupRank('l', 5)) !== undefined && performance.now() - t0 < 10_000) await new Promise((r) => setTimeout(r, 100));
      const gone = performance.now() - t0;
      t.equal(await kvs.lookupRank('l', 5), undefined, 'gone once the lease expired');
      t.comment(`registration expired ${gone.toFixed(0)} ms after SIGKILL (TTL 2 s)`);
      t.ok(gone < 6000, 'within a few seconds of the TTL');
      t.same(
        seen.map((e) => (e.type === 'registered' ? `+${e.info.rank}` : e.type === 'removed' ? `-${e.rank}` : e.type)),
        ['+5', '-5'],
        'watchRanks saw it come and go',
      );

      // A clean close revokes at once.
      const other = await open(etcd, prefix);
      await other.registerRank('l', { rank: 6, address: 'node6:7000' });
      const never = await open(etcd, prefix, { rankLeaseTtlSec: 0 });
      await never.registerRank('l', { rank: 7, address: 'node7:7000' });
      await other.close();
      await never.close();
      t.equal(await kvs.lookupRank('l', 6), undefined, 'revoked on close');
      t.ok(await kvs.lookupRank('l', 7), 'rankLeaseTtlSec 0: permanent');
    });

    t.test('unreachable etcd', async (t) => {
      const port = await new Promise<number>((resolve) => {
        const s = createServer().listen(0, '127.0.0.1', () => {
          const p = (s.address() as { port: number }).port;
          s.close(() => resolve(p));
        });
      });
      const t0 = performance.now();
      await t.rejects(openKvs(`etcd://127.0.0.1:${port}`, { connectTimeoutMs: 300, env: {} }), {
        code: 'DYAD_ECONNREFUSED',
        errno: errnos.ECONNREFUSED,
        message: new RegExp(`127\\.0\\.0\\.1:${port}`),
      });
      t.ok(performance.now() - t0 < 3000, 'gives up after connectTimeoutMs');

      const prefix = `/down${++prefixes}`;
      const kvs = await open(etcd, prefix, { requestTimeoutMs: 400 });
      t.teardown(() => kvs.close());
      await kvs.createNamespace('d');
      await etcd.stop();
      try {
        // Refused, or (a call queued while gRPC reconnects) timed out; either names etcd.
        for (const [what, op] of [
          ['lookup', () => kvs.lookup('d', 'x')],
          ['publish', () => kvs.publish('d', 'x', file())],
        ] as const) {
          const err = await op().then(
            () => undefined,
            (e: unknown) => e as DyadError,
          );
          t.match(err, { code: /^DYAD_E(CONNREFUSED|TIMEDOUT)$/, message: new RegExp(`etcd at ${etcd.endpoint}`) }, `${what} fails naming etcd`);
          t.ok(err !== undefined && [errnos.ECONNREFUSED, errnos.ETIMEDOUT].includes(err.errno), `${what} errno ${err?.errno}`);
        }
        await t.rejects(kvs.wait('d', 'x', { timeoutMs: 200 }), { code: 'DYAD_ETIMEDOUT' }, 'a wait with a timeout still times out');
        const forever = kvs.wait('d', 'x', { signal: AbortSignal.timeout(15_000) });
        await new Promise((r) => setTimeout(r, 600));
        await etcd.start();
        const rec = await kvs.publish('d', 'x', file());
        t.same(await forever, rec, 'a wait without a timeout outlives the outage');
      } finally {
        if (!etcd.running) await etcd.start();
      }
    });

    t.test('a cache in front of etcd follows other clients', async (t) => {
      const prefix = `/cache${++prefixes}`;
      const producer = await open(etcd, prefix);
      const cached = await openKvs(etcd.url(prefix), { env: {}, cache: true });
      t.teardown(() => Promise.all([producer.close(), cached.close()]));
      await producer.createNamespace('k');
      t.equal(await cached.lookup('k', 'f'), undefined);
      t.ok(await (cached as CachedKvs).watching('k'), 'subscribed');
      t.equal(await cached.lookup('k', 'f'), undefined, 'absence cached');
      const before = (cached as CachedKvs).stats().hits;
      t.equal(await cached.lookup('k', 'f'), undefined);
      t.equal((cached as CachedKvs).stats().hits, before + 1, 'served from the cache');
      const rec = await producer.publish('k', 'f', file());
      t.same(await cached.wait('k', 'f', { timeoutMs: 5000 }), rec);
      t.same(await cached.lookup('k', 'f'), rec, 'the change event replaced the cached absence');
      await producer.unpublish('k', 'f');
      const deadline = performance.now() + 5000;
      while ((await cached.lookup('k', 'f')) !== undefined && performance.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      t.equal(await cached.lookup('k', 'f'), undefined, 'and the removal');
    });

    t.test('concurrent clients keep the tree well formed', async (t) => {
      const prefix = `/race${++prefixes}`;
      const clients = await Promise.all([0, 1, 2].map(() => open(etcd, prefix)));
      t.teardown(() => Promise.all(clients.map((c) => c.close())));
      await clients[0]!.createNamespace('x');
      const paths = ['a/1', 'a/2', 'a/b/1', 'a/b/2', 'a/b/c/1', 'd/1', 'd/e/1', 'top'];
      let seed = 7;
      const rnd = (n: number): number => ((seed = (seed * 1103515245 + 12345) >>> 0) % n);
      await Promise.all(
        clients.map(async (c) => {
          for (let i = 0; i < 80; i++) {
            const p = paths[rnd(paths.length)]!;
            if (rnd(3) === 0) await c.unpublish('x', p);
            else await c.publish('x', p, file());
          }
        }),
      );
      // Every directory reachable from the root is non-empty, and its entries agree with lookups and DYAD keys.
      const kvs = clients[0]!;
      const walk = async (dir: string): Promise<string[]> => {
        const entries: DirEntry[] = await kvs.list('x', dir);
        if (dir !== '') t.ok(entries.length > 0, `${dir} is not empty`);
        const files: string[] = [];
        for (const e of entries) {
          const p = dir === '' ? e.name : `${dir}/${e.name}`;
          t.same(await kvs.lookup('x', p), e.record, `${p} lookup matches its entry`);
          if (e.record.kind === 'dir') files.push(...(await walk(p)));
          else files.push(p);
        }
        return files;
      };
      const files = await walk('');
      const stored = (await raw.getAll().prefix(`${prefix}/ns/x/k/`).keys()).map((k) => k.slice(`${prefix}/ns/x/k/`.length)).sort();
      t.same(stored, files.map((p) => genPathKey(p)).sort(), 'exactly the listed files have DYAD keys');
    });
  });
}
