/**
 * Change events held during a burst (src/kvs/embedded/fanout.ts): what
 * leaves at once, what waits and leaves together, whose copy carries the
 * pushed bytes, and, over real sockets, that a held event still reaches a
 * watcher before the reply to a request sent after its change.
 *
 * The hold is set to a minute, so "held" never depends on how fast this
 * machine runs the test.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { Fanout, type Watcher } from '../src/kvs/embedded/fanout.js';
import { bytesOf, decodeContent, FrameDecoder } from '../src/kvs/embedded/protocol.js';
import { openKvs, startKvsServer, type KvsChange, type KvsWatchEvent, type PublishInput, type WatchableKvs } from '../src/kvs/index.js';

const MINUTE = 60_000;
const file: PublishInput = { owner: 0, size: 1, mode: 0o100644, mtimeMs: 0, digest: '' };

/** A watcher that decodes what it is sent. */
interface Seen {
  rev: number;
  /** data: the pushed bytes, as text. */
  changes: Array<{ path: string; data?: string }>;
}

function watcher(): Watcher & { frames: Seen[] } {
  const decoder = new FrameDecoder(1 << 24);
  const frames: Seen[] = [];
  return {
    frames,
    send: (buf: Buffer) => {
      for (const m of decoder.push(buf)) {
        const f = m as { rev: number; changes: Array<{ path: string; bin?: [number, number] }> };
        const bytes = bytesOf(m);
        frames.push({
          rev: f.rev,
          changes: f.changes.map((c) => {
            if (!c.bin) return { path: c.path };
            // Past what a publisher may push (the 1 MiB test below): its size will do.
            const data = c.bin[1] > 1000 ? `${c.bin[1]} bytes` : decodeContent(c.bin, bytes)!.toString();
            return { path: c.path, data };
          }),
        });
      }
    },
  };
}

const change = (upath: string, content?: Uint8Array): KvsChange => ({
  upath,
  record: { kind: 'file', owner: 0, size: content?.length ?? 0, mode: 0o100644, mtimeMs: 0, digest: '', version: 1 },
  ...(content ? { content } : {}),
});

t.test('the first event leaves at once, the ones after it wait and leave in one frame', async (t) => {
  const f = new Fanout('ns', MINUTE);
  const a = watcher();
  const b = watcher();
  f.watchers.add(a);
  f.watchers.add(b);
  f.change(1, [change('x')], undefined);
  t.equal(a.frames.length, 1, 'after a quiet spell: sent at once');
  t.equal(b.frames.length, 1);
  f.change(2, [change('y')], undefined);
  f.change(3, [change('z'), change('')], undefined);
  t.equal(a.frames.length, 1, 'within the hold: held');
  t.ok(f.pending);
  f.flush();
  t.equal(a.frames.length, 2, 'flush sends one frame');
  t.same(
    a.frames[1]!.changes.map((c) => c.path),
    ['y', 'z', ''],
    'with every held change, in order',
  );
  t.equal(a.frames[1]!.rev, 3, 'named by the last revision');
  t.same(b.frames, a.frames, 'every watcher gets the same');
  t.notOk(f.pending);
  f.stop();
});

t.test('pushed bytes go to every watcher but the one that pushed them', async (t) => {
  const f = new Fanout('ns', MINUTE);
  const pusher = watcher();
  const other = watcher();
  f.watchers.add(pusher);
  f.watchers.add(other);
  f.change(1, [change('first')], undefined);
  f.change(2, [change('p', Buffer.from('from the pusher'))], pusher);
  f.change(3, [change('q', Buffer.from('from this process'))], undefined);
  f.flush();
  const [pc, oc] = [pusher.frames[1]!.changes, other.frames[1]!.changes];
  t.equal(pc[0]!.data, undefined, 'the pusher does not get its own bytes back');
  t.equal(pc[1]!.data, 'from this process', 'but gets the bytes of others');
  t.equal(oc[0]!.data, 'from the pusher');
  t.equal(oc[1]!.data, 'from this process');
  f.stop();
});

t.test('held pushed bytes past 1 MiB leave at once; stop() drops what is held', async (t) => {
  const f = new Fanout('ns', MINUTE);
  const w = watcher();
  f.watchers.add(w);
  f.change(1, [change('a')], undefined);
  f.change(2, [change('b', Buffer.alloc(600 << 10))], undefined);
  t.equal(w.frames.length, 1, 'one big change is held');
  f.change(3, [change('c', Buffer.alloc(600 << 10))], undefined);
  t.equal(w.frames.length, 2, 'two are over the limit: sent');
  t.same(
    w.frames[1]!.changes.map((c) => c.path),
    ['b', 'c'],
  );
  f.change(4, [change('d')], undefined);
  f.stop();
  f.flush();
  t.equal(w.frames.length, 2, 'nothing left to send after stop()');
});

t.test('a held event reaches a watcher before the reply to a request sent after its change', async (t) => {
  const dataDir = await mkdtemp(join(tmpdir(), 'kvs-fanout-'));
  const server = await startKvsServer({ dataDir, eventHoldMs: MINUTE, env: {} });
  const secret = await server.createNamespace('ns');
  const publisher = await openKvs(server.url, { secret, env: {} });
  const reader = (await openKvs(server.url, { secret, env: {} })) as WatchableKvs;
  t.teardown(async () => {
    await publisher.close();
    await reader.close();
    await server.close();
    await rm(dataDir, { recursive: true, force: true });
  });
  const seen: string[] = [];
  const stop = await reader.watch('ns', (ev: KvsWatchEvent) => {
    if (ev.type === 'change') for (const c of ev.changes) if (c.record?.kind === 'file') seen.push(c.upath);
  });
  t.teardown(stop);
  for (const name of ['one', 'two', 'three']) await publisher.publish('ns', name, file);
  // 'two' and 'three' are held for a minute, unless a reply flushes them.
  const rec = await reader.lookup('ns', 'three');
  t.equal(rec?.kind, 'file');
  t.same(seen, ['one', 'two', 'three'], 'the events came first, in order');
});

t.test('eventHoldMs is checked', async (t) => {
  await t.rejects(startKvsServer({ eventHoldMs: -1, env: {} }), { code: 'DYAD_ECONFIG', message: /eventHoldMs/ });
  await t.rejects(startKvsServer({ eventHoldMs: Number.NaN, env: {} }), { code: 'DYAD_ECONFIG' });
});
