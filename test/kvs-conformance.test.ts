/**
 * Behaviour every Kvs backend must share, run against each of them: the
 * in-process store (mem:), the embedded server over loopback TCP (dyad://), a
 * CachedKvs in front of the embedded client, and a real etcd (etcd://, bare and
 * cached; skipped where there is no etcd binary). A new backend joins by adding
 * a factory to `backends`.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { errnos } from '../src/errors.js';
import { etcdUnavailable, startEtcd, type EtcdServer } from './helpers/etcd.js';
import {
  DIR_MODE,
  isWatchable,
  openKvs,
  startKvsServer,
  type Kvs,
  type KvsWatchEvent,
  type PublishInput,
} from '../src/kvs/index.js';

interface Backend {
  /** Data operations (authorised for any namespace the admin creates). */
  kvs: Kvs;
  /** Namespace administration. */
  admin: Kvs;
  close(): Promise<void>;
}

const backends: Record<string, () => Promise<Backend>> = {
  mem: async () => {
    const kvs = await openKvs('mem:');
    return { kvs, admin: kvs, close: () => kvs.close() };
  },
  dyad: async () => dyadBackend(false),
  'dyad+cache': async () => dyadBackend(true),
};
if (etcdUnavailable() === undefined) {
  backends.etcd = async () => etcdBackend(false);
  backends['etcd+cache'] = async () => etcdBackend(true);
} else {
  t.comment(`etcd backends skipped: ${etcdUnavailable()}`);
}

// One etcd for the whole file; each backend instance gets its own key prefix, so
// namespaces of the same name ('closing') do not meet.
let etcd: Promise<EtcdServer> | undefined;
let etcdPrefixes = 0;
t.teardown(async () => {
  if (etcd !== undefined) await (await etcd).destroy();
});

async function etcdBackend(cache: boolean): Promise<Backend> {
  etcd ??= startEtcd();
  const url = (await etcd).url(`/conformance${++etcdPrefixes}`);
  const admin = await openKvs(url, { env: {} });
  const kvs = await openKvs(url, { env: {}, cache });
  return {
    kvs,
    admin,
    close: async () => {
      await kvs.close();
      await admin.close();
    },
  };
}

async function dyadBackend(cache: boolean): Promise<Backend> {
  const dataDir = await mkdtemp(join(tmpdir(), 'kvs-conf-'));
  const server = await startKvsServer({ dataDir });
  const admin = await openKvs(server.url, { adminSecret: server.adminSecret });
  // Data client authenticates per namespace from the exported secret files, as a real client would.
  const kvs = await openKvs(server.url, { secretDir: join(dataDir, 'secrets'), cache, env: {} });
  return {
    kvs,
    admin,
    close: async () => {
      await kvs.close();
      await admin.close();
      await server.close();
      await rm(dataDir, { recursive: true, force: true });
    },
  };
}

const file = (owner = 1, size = 100): PublishInput => ({ owner, size, mode: 0o100644, mtimeMs: 1_700_000_000_000, digest: 'sha256:abc' });

let nsCounter = 0;

for (const [name, make] of Object.entries(backends)) {
  t.test(name, async (t) => {
    const b = await make();
    t.teardown(() => b.close());
    const { kvs, admin } = b;
    const newNs = async (): Promise<string> => {
      const ns = `ns${++nsCounter}`;
      await admin.createNamespace(ns);
      return ns;
    };

    t.test('publish and lookup', async (t) => {
      const ns = await newNs();
      t.equal(await kvs.lookup(ns, 'a/b/c.txt'), undefined);
      const rec = await kvs.publish(ns, 'a/b/c.txt', file(3, 42));
      t.match(rec, { owner: 3, size: 42, mode: 0o100644, mtimeMs: 1_700_000_000_000, digest: 'sha256:abc', kind: 'file' });
      t.ok(rec.version > 0);
      t.same(await kvs.lookup(ns, 'a/b/c.txt'), rec);
      const dir = await kvs.lookup(ns, 'a/b');
      t.match(dir, { kind: 'dir', owner: -1, size: 0, mode: DIR_MODE, digest: '' });
      t.match(await kvs.lookup(ns, ''), { kind: 'dir' }, 'root');
      t.equal(await kvs.lookup(ns, 'a/b/c'), undefined);
      const again = await kvs.publish(ns, 'a/b/c.txt', file(4, 43));
      t.ok(again.version > rec.version, 'republish bumps the version');
      t.match(await kvs.lookup(ns, 'a/b/c.txt'), { owner: 4, size: 43 });
    });

    t.test('wait', async (t) => {
      const ns = await newNs();
      const early = kvs.wait(ns, 'w/1');
      const many = Array.from({ length: 100 }, () => kvs.wait(ns, 'w/1'));
      const dirWait = kvs.wait(ns, 'w');
      const rec = await kvs.publish(ns, 'w/1', file());
      t.same(await early, rec, 'wait before publish');
      t.same(await Promise.all(many), many.map(() => rec), 'many waiters on one key');
      t.match(await dirWait, { kind: 'dir' }, 'a directory appears with its first file');
      t.same(await kvs.wait(ns, 'w/1'), rec, 'wait after publish');
      t.same(await kvs.wait(ns, 'w/1', { timeoutMs: 0 }), rec, 'present record beats a zero timeout');
    });

    t.test('wait timeout and abort', async (t) => {
      const ns = await newNs();
      await t.rejects(kvs.wait(ns, 'never', { timeoutMs: 50 }), { code: 'DYAD_ETIMEDOUT', errno: errnos.ETIMEDOUT });
      const ac = new AbortController();
      const aborted = t.rejects(kvs.wait(ns, 'never', { signal: ac.signal }), { code: 'DYAD_EINTR', errno: errnos.EINTR });
      ac.abort();
      await aborted;
      await t.rejects(kvs.wait(ns, 'never', { signal: AbortSignal.abort() }), { code: 'DYAD_EINTR' });
      // Given-up waits leave no residue: a later waiter on the same key still works.
      const later = kvs.wait(ns, 'never');
      await kvs.publish(ns, 'never', file());
      t.match(await later, { kind: 'file' });
    });

    t.test('list nested directories', async (t) => {
      const ns = await newNs();
      for (const p of ['a/b/c', 'a/b/d', 'a/e', 'f']) await kvs.publish(ns, p, file());
      const names = async (dir: string): Promise<string[]> => (await kvs.list(ns, dir)).map((e) => `${e.name}:${e.record.kind}`);
      t.same(await names(''), ['a:dir', 'f:file']);
      t.same(await names('a'), ['b:dir', 'e:file']);
      t.same(await names('a/b'), ['c:file', 'd:file']);
      await t.rejects(kvs.list(ns, 'nope'), { code: 'DYAD_ENOENT', errno: errnos.ENOENT });
      await t.rejects(kvs.list(ns, 'f'), { code: 'DYAD_ENOTDIR' });
      await t.rejects(kvs.publish(ns, 'f/x', file()), { code: 'DYAD_ENOTDIR' }, 'a file cannot become a directory');
      await t.rejects(kvs.publish(ns, 'a', file()), { code: 'DYAD_EISDIR' }, 'a directory cannot become a file');
    });

    t.test('large directory listing', async (t) => {
      const ns = await newNs();
      const n = 2500; // several protocol pages
      await Promise.all(Array.from({ length: n }, (_, i) => kvs.publish(ns, `big/f${String(i).padStart(5, '0')}`, file())));
      const entries = await kvs.list(ns, 'big');
      t.equal(entries.length, n);
      t.equal(entries[0]!.name, 'f00000');
      t.equal(entries[n - 1]!.name, `f0${n - 1}`);
    });

    t.test('unpublish', async (t) => {
      const ns = await newNs();
      const first = await kvs.publish(ns, 'x/y/z', file());
      await kvs.publish(ns, 'x/keep', file());
      t.equal(await kvs.unpublish(ns, 'x/y/z'), true);
      t.equal(await kvs.unpublish(ns, 'x/y/z'), false);
      t.equal(await kvs.lookup(ns, 'x/y/z'), undefined);
      t.equal(await kvs.lookup(ns, 'x/y'), undefined, 'emptied directory disappears');
      t.same((await kvs.list(ns, 'x')).map((e) => e.name), ['keep']);
      await t.rejects(kvs.unpublish(ns, 'x'), { code: 'DYAD_EISDIR' });
      t.equal(await kvs.unpublish(ns, 'x/keep'), true);
      t.same(await kvs.list(ns, ''), []);
      const back = await kvs.publish(ns, 'x/y/z', file());
      t.ok(back.version > first.version, 'versions keep growing across unpublish');
    });

    t.test('namespaces', async (t) => {
      const ns = await newNs();
      t.equal(await kvs.hasNamespace(ns), true);
      t.ok((await admin.listNamespaces()).includes(ns));
      await t.rejects(admin.createNamespace(ns), { code: 'DYAD_EEXIST' });
      const pending = t.rejects(kvs.wait(ns, 'gone'), { code: 'DYAD_ENONS' }, 'pending waits fail when the namespace goes');
      // Make sure the wait reached the backend before the namespace goes.
      await kvs.lookup(ns, 'gone');
      await admin.removeNamespace(ns);
      await pending;
      t.equal(await kvs.hasNamespace(ns), false);
      const missing = `missing${nsCounter}`;
      const ops: Array<() => Promise<unknown>> = [
        () => kvs.lookup(missing, 'a'),
        () => kvs.publish(missing, 'a', file()),
        () => kvs.list(missing, ''),
        () => kvs.wait(missing, 'a'),
        () => kvs.listRanks(missing),
        () => admin.removeNamespace(missing),
      ];
      for (const op of ops) {
        await t.rejects(op(), { code: 'DYAD_ENONS', errno: errnos.ENOENT, message: new RegExp(missing) });
      }
      await t.rejects(kvs.lookup('bad/name', 'a'), { code: 'DYAD_EINVAL' });
    });

    t.test('rank registry', async (t) => {
      const ns = await newNs();
      t.equal(await kvs.lookupRank(ns, 0), undefined);
      await kvs.registerRank(ns, { rank: 2, address: 'node2:7000' });
      await kvs.registerRank(ns, { rank: 0, address: 'node0:7000', meta: { ucx: 'abc' } });
      await kvs.registerRank(ns, { rank: 2, address: 'node2:7001' });
      t.same(await kvs.lookupRank(ns, 0), { rank: 0, address: 'node0:7000', meta: { ucx: 'abc' } });
      t.same(
        (await kvs.listRanks(ns)).map((r) => [r.rank, r.address]),
        [
          [0, 'node0:7000'],
          [2, 'node2:7001'],
        ],
      );
      await t.rejects(kvs.registerRank(ns, { rank: -1, address: 'x:1' }), { code: 'DYAD_EINVAL' });
      await t.rejects(kvs.registerRank(ns, { rank: 1, address: '' }), { code: 'DYAD_EINVAL' });
    });

    t.test('argument validation', async (t) => {
      const ns = await newNs();
      for (const p of ['/abs', 'a//b', '../x', 'a/./b', 'trailing/']) {
        await t.rejects(kvs.publish(ns, p, file()), { code: 'DYAD_EINVAL' }, p);
      }
      await t.rejects(kvs.publish(ns, 'ok', { ...file(), size: -1 }), { code: 'DYAD_EINVAL' });
      await t.rejects(kvs.publish(ns, 'ok', { ...file(), digest: 'has space' }), { code: 'DYAD_EINVAL' });
    });

    if (isWatchable(kvs)) {
      t.test('watch events', async (t) => {
        const ns = await newNs();
        const events: KvsWatchEvent[] = [];
        const stop = await kvs.watch(ns, (ev) => events.push(ev));
        const rec = await kvs.publish(ns, 'd/e/f', file());
        await kvs.unpublish(ns, 'd/e/f');
        stop();
        const changes = events.flatMap((ev) => (ev.type === 'change' ? ev.changes.map((c) => `${c.upath}:${c.record?.kind ?? '-'}`) : []));
        t.same(changes, [':dir', 'd:dir', 'd/e:dir', 'd/e/f:file', 'd/e/f:-', 'd/e:-', 'd:-', ':dir']);
        t.equal(events[0]?.type === 'change' ? events[0].rev : -1, rec.version);
      });
    }

    t.test('close rejects pending waits', async (t) => {
      const other = await make();
      t.teardown(() => other.close());
      await other.admin.createNamespace('closing');
      const w = t.rejects(other.kvs.wait('closing', 'never'), { code: 'DYAD_ECLOSED' });
      await other.kvs.lookup('closing', 'never');
      await other.kvs.close();
      await w;
      await t.rejects(other.kvs.lookup('closing', 'x'), { code: 'DYAD_ECLOSED' });
    });
  });
}
