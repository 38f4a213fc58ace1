/**
 * CachedKvs: hits avoid the backend, and with a subscription the cache follows
 * changes made by other clients (positive, negative and listing entries), drops
 * everything on a reconnect, and falls back to short-lived positive entries for
 * a backend that cannot push changes.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { bytesOf, decodeContent, encodeFrame, FrameDecoder, MAX_PUSHED_BYTES } from '../src/kvs/embedded/protocol.js';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import {
  CachedKvs,
  EmbeddedKvsClient,
  KvsServer,
  MemoryKvs,
  startKvsServer,
  type DirEntry,
  type FileRecord,
  type Kvs,
  type PublishInput,
  type RankInfo,
  type WaitOptions,
} from '../src/kvs/index.js';

const rec = (size: number): PublishInput => ({ owner: 2, size, mode: 0o100644, mtimeMs: 5, digest: '' });

/** A Kvs without watch(), to exercise the fallback. */
class Unwatchable implements Kvs {
  constructor(private readonly k: Kvs) {}
  publish(ns: string, p: string, r: PublishInput): Promise<FileRecord> {
    return this.k.publish(ns, p, r);
  }
  lookup(ns: string, p: string): Promise<FileRecord | undefined> {
    return this.k.lookup(ns, p);
  }
  wait(ns: string, p: string, o?: WaitOptions): Promise<FileRecord> {
    return this.k.wait(ns, p, o);
  }
  unpublish(ns: string, p: string): Promise<boolean> {
    return this.k.unpublish(ns, p);
  }
  list(ns: string, p: string): Promise<DirEntry[]> {
    return this.k.list(ns, p);
  }
  createNamespace(ns: string): Promise<void> {
    return this.k.createNamespace(ns);
  }
  removeNamespace(ns: string): Promise<void> {
    return this.k.removeNamespace(ns);
  }
  listNamespaces(): Promise<string[]> {
    return this.k.listNamespaces();
  }
  hasNamespace(ns: string): Promise<boolean> {
    return this.k.hasNamespace(ns);
  }
  registerRank(ns: string, i: RankInfo): Promise<void> {
    return this.k.registerRank(ns, i);
  }
  lookupRank(ns: string, r: number): Promise<RankInfo | undefined> {
    return this.k.lookupRank(ns, r);
  }
  listRanks(ns: string): Promise<RankInfo[]> {
    return this.k.listRanks(ns);
  }
  close(): Promise<void> {
    return this.k.close();
  }
}

t.test('over the embedded server', async (t) => {
  const dataDir = await mkdtemp(join(tmpdir(), 'kvs-cache-'));
  t.teardown(() => rm(dataDir, { recursive: true, force: true }));
  const s1 = await startKvsServer({ dataDir });
  const port = s1.address!.port;
  const secret = await s1.createNamespace('c');
  const inner = await EmbeddedKvsClient.connect(s1.url, { secret, env: {}, reconnectMaxMs: 200 });
  const cache = new CachedKvs(inner);
  t.teardown(() => cache.close());
  const other = await EmbeddedKvsClient.connect(s1.url, { secret, env: {} });
  t.teardown(() => other.close());
  t.equal(await cache.watching('c'), true, 'subscribed');

  // Resolves once the cache's client has received the next change of 'c' (the
  // cache's own listener was registered first, so it has run by then).
  const nextChange = async (): Promise<void> => {
    let stop: (() => void) | undefined;
    await new Promise<void>((resolve) => {
      void inner.watch('c', (ev) => ev.type === 'change' && resolve()).then((s) => (stop = s));
    });
    stop?.();
  };
  const misses = (): number => cache.stats().misses;

  await other.publish('c', 'd/a', rec(1));
  t.match(await cache.lookup('c', 'd/a'), { size: 1 });
  const m0 = misses();
  t.match(await cache.lookup('c', 'd/a'), { size: 1 });
  t.equal(misses(), m0, 'second lookup is a hit');

  t.equal(await cache.lookup('c', 'd/b'), undefined);
  t.equal(await cache.lookup('c', 'd/b'), undefined);
  t.equal(misses(), m0 + 1, 'absence is cached too');
  let changed = nextChange();
  await other.publish('c', 'd/b', rec(2));
  await changed;
  t.match(await cache.lookup('c', 'd/b'), { size: 2 }, 'another client publishing replaces the negative entry');

  t.same((await cache.list('c', 'd')).map((e) => e.name), ['a', 'b']);
  const m1 = misses();
  t.same((await cache.list('c', 'd')).map((e) => e.name), ['a', 'b']);
  t.match(await cache.lookup('c', 'd/a'), { size: 1 });
  t.equal(misses(), m1, 'listing and the records it carried are hits');
  changed = nextChange();
  await other.publish('c', 'd/c', rec(3));
  await changed;
  t.same((await cache.list('c', 'd')).map((e) => e.name), ['a', 'b', 'c'], 'listing invalidated by the change');

  changed = nextChange();
  const v2 = await other.publish('c', 'd/a', rec(10));
  await changed;
  t.same(await cache.lookup('c', 'd/a'), v2, 'republish seen');
  changed = nextChange();
  await other.unpublish('c', 'd/a');
  await changed;
  t.equal(await cache.lookup('c', 'd/a'), undefined, 'unpublish seen');
  const m2 = misses();
  t.match(await cache.wait('c', 'd/b'), { size: 2 });
  t.equal(misses(), m2, 'wait on a cached record returns at once');

  // A restart: everything cached is dropped, and a change made before the
  // client got back is not hidden by the stale negative entry.
  t.equal(await cache.lookup('c', 'gap'), undefined);
  await s1.close();
  const s2 = await KvsServer.open({ dataDir });
  t.teardown(() => s2.close());
  await s2.store.publish('c', 'gap', rec(4));
  await s2.listen('127.0.0.1', port);
  t.match(await cache.lookup('c', 'gap'), { size: 4 });
  t.match(await cache.lookup('c', 'd/b'), { size: 2 });
});

/** A cache over a new in-process store, subscribed to namespace `ns` of it. */
async function cacheOverMemory(t: { teardown(fn: () => unknown): void; equal(found: unknown, wanted: unknown): void }, ns: string): Promise<{ store: MemoryKvs; cache: CachedKvs }> {
  const store = MemoryKvs.open('');
  const cache = new CachedKvs(store);
  t.teardown(() => cache.close());
  await store.createNamespace(ns);
  t.equal(await cache.watching(ns), true);
  return { store, cache };
}

t.test('over an in-process store', async (t) => {
  const { store, cache } = await cacheOverMemory(t, 'm');
  t.equal(await cache.lookup('m', 'x'), undefined);
  await store.publish('m', 'x', rec(1)); // events are synchronous in-process
  const m0 = cache.stats().misses;
  t.match(await cache.lookup('m', 'x'), { size: 1 });
  t.equal(cache.stats().misses, m0);
  await cache.removeNamespace('m');
  await t.rejects(cache.lookup('m', 'x'), { code: 'DYAD_ENONS' });
});

t.test('known(): what the cache can answer without asking, uncounted', async (t) => {
  const store = MemoryKvs.open('');
  // Answers only when asked, as a store in another process: what the cache knows shows.
  Object.defineProperty(store, 'known', { value: undefined });
  const cache = new CachedKvs(store);
  const noNeg = new CachedKvs(store, { cacheNegative: false });
  t.teardown(() => Promise.all([cache.close(), noNeg.close()]));
  await store.createNamespace('k');
  t.equal(await cache.watching('k'), true);
  t.equal(await noNeg.watching('k'), true);
  t.equal(cache.known('k', 'x'), null, 'never seen: only a lookup can tell');
  await cache.lookup('k', 'x');
  await noNeg.lookup('k', 'x');
  t.equal(cache.known('k', 'x'), undefined, 'a cached absence');
  t.equal(noNeg.known('k', 'x'), null, 'not kept without cacheNegative');
  await store.publish('k', 'x', rec(3));
  t.match(cache.known('k', 'x'), { kind: 'file', size: 3 }, 'the record, from the change event');
  t.match(noNeg.known('k', 'x'), { kind: 'file', size: 3 });
  const before = cache.stats();
  cache.known('k', 'x');
  cache.known('k', 'y');
  t.same(cache.stats(), before, 'neither a hit nor a miss');
});

t.test('known(): a store in this process is asked at once, for absences too', async (t) => {
  const { store, cache } = await cacheOverMemory(t, 'k');
  t.equal(cache.known('k', 'x'), undefined, 'never looked up, and known absent');
  await store.publish('k', 'd/x', rec(4));
  t.match(cache.known('k', 'd/x'), { kind: 'file', size: 4 });
  t.match(cache.known('k', 'd'), { kind: 'dir' });
  t.equal(cache.known('nope', 'x'), null, 'no such namespace: only a lookup can say why');
  await store.close();
  t.equal(store.known('k', 'd/x'), null, 'a closed handle knows nothing');
});

t.test('an in-process store sends a publisher\'s own watchers its change without the pushed bytes', async (t) => {
  const name = `own-bytes-${process.pid}`;
  t.teardown(() => MemoryKvs.dropShared(name));
  const writer = MemoryKvs.open(name);
  const reader = MemoryKvs.open(name);
  await writer.createNamespace('p');
  const seen = (kvs: MemoryKvs) => {
    const got: Array<Uint8Array | undefined> = [];
    void kvs.watch('p', (ev) => {
      if (ev.type === 'change') for (const c of ev.changes) if (c.upath === 'f') got.push(c.content);
    });
    return got;
  };
  const mine = seen(writer);
  const theirs = seen(reader);
  await writer.publish('p', 'f', rec(3), { content: Buffer.from('abc') });
  t.same(mine, [undefined], 'not back to the publisher');
  t.same(theirs.map((c) => c && Buffer.from(c).toString()), ['abc'], 'another handle on the store gets them');
  await reader.publish('p', 'f', rec(3), { content: Buffer.from('xyz') });
  t.same(mine.map((c) => c && Buffer.from(c).toString()), [undefined, 'xyz'], 'and the publisher gets the next one, made by another');
});

t.test('fallback without change notifications', async (t) => {
  const base = MemoryKvs.open('');
  await base.createNamespace('f');
  await base.publish('f', 'x', rec(1));
  const cache = new CachedKvs(new Unwatchable(base), { ttlMs: 60_000 });
  t.teardown(() => cache.close());
  t.equal(await cache.watching('f'), false);
  await cache.lookup('f', 'x');
  const m0 = cache.stats().misses;
  await cache.lookup('f', 'x');
  t.equal(cache.stats().misses, m0, 'positive records are cached');
  await cache.lookup('f', 'nope');
  await cache.lookup('f', 'nope');
  t.equal(cache.stats().misses, m0 + 2, 'absences are not');
  await cache.list('f', '');
  await cache.list('f', '');
  t.equal(cache.stats().misses, m0 + 4, 'nor listings');

  const expiring = new CachedKvs(new Unwatchable(base), { ttlMs: 0 });
  await expiring.lookup('f', 'x');
  await expiring.lookup('f', 'x');
  t.equal(expiring.stats().hits, 0, 'entries expire after ttlMs');

  const noNeg = new CachedKvs(base, { cacheNegative: false });
  t.equal(await noNeg.watching('f'), true);
  await noNeg.lookup('f', 'nope');
  await noNeg.lookup('f', 'nope');
  t.equal(noNeg.stats().hits, 0, 'cacheNegative: false');
});

t.test('content pushed with a publication reaches other caches, once, for its version only', async (t) => {
  const dataDir = await mkdtemp(join(tmpdir(), 'kvs-push-'));
  t.teardown(() => rm(dataDir, { recursive: true, force: true }));
  const s = await startKvsServer({ dataDir });
  t.teardown(() => s.close());
  const secret = await s.createNamespace('p');
  const reader = new CachedKvs(await EmbeddedKvsClient.connect(s.url, { secret, env: {} }));
  t.teardown(() => reader.close());
  const writer = new CachedKvs(await EmbeddedKvsClient.connect(s.url, { secret, env: {} }));
  t.teardown(() => writer.close());
  t.equal(await reader.watching('p'), true);
  t.equal(await writer.watching('p'), true);

  const bytes = Buffer.from('ten int32s would be here');
  const changed = new Promise<void>((resolve) => {
    void (reader.inner as EmbeddedKvsClient).watch('p', (ev) => ev.type === 'change' && resolve());
  });
  const echoed: Array<Uint8Array | undefined> = [];
  const stopEcho = await (writer.inner as EmbeddedKvsClient).watch('p', (ev) => {
    if (ev.type === 'change') for (const c of ev.changes) if (c.upath === 'dir/small') echoed.push(c.content);
  });
  const v1 = await writer.publish('p', 'dir/small', rec(bytes.length), { content: bytes });
  await changed;
  stopEcho();
  t.same(echoed, [undefined], 'the server does not send the bytes back to their publisher');
  t.same(Buffer.from(reader.takePushedContent('p', 'dir/small', v1) ?? []), bytes, 'the reader holds the bytes');
  t.equal(reader.takePushedContent('p', 'dir/small', v1), undefined, 'taken once');
  t.equal(writer.takePushedContent('p', 'dir/small', v1), undefined, 'the publisher keeps no copy of its own bytes');

  // A newer version without content: the old bytes must not stand in for it.
  const again = new Promise<void>((resolve) => {
    void (reader.inner as EmbeddedKvsClient).watch('p', (ev) => ev.type === 'change' && resolve());
  });
  await writer.publish('p', 'dir/other', rec(3), { content: Buffer.from('old') });
  const v3 = await writer.publish('p', 'dir/other', rec(3));
  await again;
  await reader.lookup('p', 'dir/other');
  t.equal(reader.takePushedContent('p', 'dir/other', v3), undefined, 'a republish without bytes drops the older bytes');

  // Never stored: a client connecting afterwards gets the record, not the bytes.
  const late = new CachedKvs(await EmbeddedKvsClient.connect(s.url, { secret, env: {} }));
  t.teardown(() => late.close());
  t.same(await late.lookup('p', 'dir/small'), v1);
  t.equal(late.takePushedContent('p', 'dir/small', v1), undefined);
  for (const f of readdirSync(dataDir, { recursive: true }).map(String)) {
    const file = join(dataDir, f);
    if (statSync(file).isFile()) t.notOk(readFileSync(file).includes(bytes), `${f} does not hold the bytes`);
  }

  // Bytes over the protocol's limit are not sent; the record still is.
  const big = new Promise<void>((resolve) => {
    void (reader.inner as EmbeddedKvsClient).watch('p', (ev) => ev.type === 'change' && resolve());
  });
  const vb = await writer.publish('p', 'huge', rec(300 << 10), { content: Buffer.alloc(300 << 10) });
  await big;
  t.same(await reader.lookup('p', 'huge'), vb);
  t.equal(reader.takePushedContent('p', 'huge', vb), undefined);
});

t.test('pushed content on the wire: raw bytes after the JSON, named by [offset, length]', async (t) => {
  const bytes = Buffer.alloc(7, 'xxabcyy'); // not from the shared pool
  const got = decodeContent([2, 3], bytes);
  t.same(got, Buffer.from('abc'));
  t.not(got?.buffer, bytes.buffer, 'a copy: the frame can be freed');
  t.equal(decodeContent(undefined, bytes), undefined);
  for (const bad of [[5, 3], [-1, 2], [0, 1.5], [0], '0,3', 42, [0, 3, 1]]) t.throws(() => decodeContent(bad, bytes), { code: 'DYAD_EPROTO' }, JSON.stringify(bad));
  t.throws(() => decodeContent([0, 1], undefined), { code: 'DYAD_EPROTO' }, 'a reference without bytes');
  const big = Buffer.alloc(MAX_PUSHED_BYTES + 1);
  t.throws(() => decodeContent([0, MAX_PUSHED_BYTES + 1], big), { code: 'DYAD_EPROTO' }, 'over the limit');
  t.equal(decodeContent([1, MAX_PUSHED_BYTES], big)?.length, MAX_PUSHED_BYTES);

  // A frame with bytes, through the decoder, split across reads at every offset.
  const frame = encodeFrame({ ev: 'change', changes: [{ bin: [0, 2] }, { bin: [2, 3] }] }, [Buffer.from('hi'), Buffer.from('you')]);
  t.equal(frame.readUInt32BE(0) >>> 31, 1, 'the header says bytes follow the JSON');
  for (let cut = 1; cut < frame.length; cut++) {
    const d = new FrameDecoder(1 << 20);
    const msgs = [...d.push(frame.subarray(0, cut)), ...d.push(frame.subarray(cut))];
    t.equal(msgs.length, 1);
    const m = msgs[0] as { changes: Array<{ bin: [number, number] }> };
    const b = bytesOf(m);
    if (decodeContent(m.changes[1]!.bin, b)?.toString() !== 'you' || decodeContent(m.changes[0]!.bin, b)?.toString() !== 'hi') {
      t.fail(`cut at ${cut}`);
      break;
    }
  }
  t.same(bytesOf(new FrameDecoder(1 << 20).push(encodeFrame({ a: 1 }))[0]), undefined, 'a plain frame carries none');
  const liar = Buffer.from(frame);
  liar.writeUInt32BE(1 << 20, 4); // a JSON length past the payload
  t.throws(() => new FrameDecoder(1 << 20).push(liar), { code: 'DYAD_EPROTO' });
});
