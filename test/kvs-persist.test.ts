/**
 * Durability and recovery of the embedded server: restarts (clean and SIGKILL)
 * lose no acknowledged change, a torn journal tail is dropped while damage in the
 * middle is refused, a data directory has one owner, and clients ride through a
 * restart: pending waits are re-armed, in-flight writes resent, watchers reset.
 */
import { spawn } from 'node:child_process';
import { appendFile, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import t from 'tap';
import { journalPath } from '../src/kvs/embedded/persist.js';
import {
  EmbeddedKvsClient,
  KvsServer,
  startKvsServer,
  type FileRecord,
  type KvsWatchEvent,
  type PublishInput,
} from '../src/kvs/index.js';

const rec = (size: number): PublishInput => ({ owner: 1, size, mode: 0o100644, mtimeMs: 1, digest: `d${size}` });

async function tempDir(t: { teardown(fn: () => unknown): void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'kvs-persist-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

t.test('clean restart keeps everything', async (t) => {
  const dataDir = await tempDir(t);
  const s1 = await startKvsServer({ dataDir });
  const admin = await EmbeddedKvsClient.connect(s1.url, { adminSecret: s1.adminSecret, env: {} });
  await admin.createNamespace('keep');
  await admin.createNamespace('drop');
  const published: FileRecord[] = [];
  for (let i = 0; i < 50; i++) published.push(await admin.publish('keep', `d${i % 5}/f${i}`, rec(i)));
  await admin.unpublish('keep', 'd0/f0');
  await admin.registerRank('keep', { rank: 3, address: 'n3:9000', meta: { k: 'v' } });
  await admin.removeNamespace('drop');
  const secret = await admin.namespaceSecret('keep');
  const listing = await admin.list('keep', 'd1');
  await admin.close();
  await s1.close();

  const s2 = await startKvsServer({ dataDir });
  t.teardown(() => s2.close());
  t.equal(s2.adminSecret, s1.adminSecret, 'admin secret persists');
  const c = await EmbeddedKvsClient.connect(s2.url, { secret, env: {} });
  t.teardown(() => c.close());
  t.equal(await c.lookup('keep', 'd0/f0'), undefined, 'unpublish survived');
  for (const p of published.slice(1)) t.same(await c.lookup('keep', `d${p.size % 5}/f${p.size}`), p);
  t.same(await c.list('keep', 'd1'), listing, 'directory records identical');
  t.same(await c.lookupRank('keep', 3), { rank: 3, address: 'n3:9000', meta: { k: 'v' } });
  t.equal(await c.hasNamespace('drop'), false);
  const next = await c.publish('keep', 'new', rec(1));
  t.ok(next.version > published[published.length - 1]!.version, 'versions continue after restart');

  // And once more, replaying a journal that holds a snapshot plus new entries.
  await c.close();
  await s2.close();
  const s3 = await startKvsServer({ dataDir });
  t.teardown(() => s3.close());
  t.same(s3.store.lookup('keep', 'new'), next);
  t.equal(s3.store.namespaceSecret('keep'), secret);
});

t.test('SIGKILL loses no acknowledged publication', async (t) => {
  const dataDir = await tempDir(t);
  const serverModule = new URL('../src/kvs/index.js', import.meta.url).href;
  const child = spawn(
    process.execPath,
    [
      '--input-type=module',
      '-e',
      `const { startKvsServer } = await import(${JSON.stringify(serverModule)});
       const s = await startKvsServer({ dataDir: ${JSON.stringify(dataDir)} });
       console.log(JSON.stringify({ url: s.url, admin: s.adminSecret }));`,
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  t.teardown(() => {
    child.kill('SIGKILL');
    return exited;
  });
  const first = await new Promise<string>((resolve) => createInterface({ input: child.stdout! }).once('line', resolve));
  const { url, admin } = JSON.parse(first) as { url: string; admin: string };
  const c = await EmbeddedKvsClient.connect(url, { adminSecret: admin, env: {}, requestTimeoutMs: 0 });
  await c.createNamespace('crash');
  const acked = new Map<string, FileRecord>();
  let killed = false;
  const writer = async (lane: number): Promise<void> => {
    for (let i = 0; !killed; i++) {
      const p = `lane${lane}/f${i}`;
      try {
        acked.set(p, await c.publish('crash', p, rec(i)));
      } catch {
        return;
      }
      if (acked.size === 300 && !killed) {
        killed = true;
        child.kill('SIGKILL');
      }
    }
  };
  const lanes = Promise.all([0, 1, 2, 3, 4, 5, 6, 7].map(writer));
  await exited;
  await c.close();
  await lanes;
  t.ok(acked.size >= 300);

  const s = await KvsServer.open({ dataDir });
  t.teardown(() => s.close());
  let missing = 0;
  for (const [p, r] of acked) if (JSON.stringify(s.store.lookup('crash', p)) !== JSON.stringify(r)) missing++;
  t.equal(missing, 0, `all ${acked.size} acknowledged publications survived`);
});

t.test('torn journal tail is dropped, damage in the middle is refused', async (t) => {
  const dataDir = await tempDir(t);
  const s1 = await KvsServer.open({ dataDir });
  await s1.createNamespace('j');
  for (let i = 0; i < 3; i++) await s1.store.publish('j', `f${i}`, rec(i));
  await s1.close();
  const file = journalPath(dataDir);
  const good = await readFile(file);

  const torn = Buffer.alloc(12);
  torn.writeUInt32BE(100, 0); // claims 100 payload bytes, has 4
  await appendFile(file, torn);
  const logs: string[] = [];
  const s2 = await KvsServer.open({ dataDir, log: (_level, msg) => logs.push(msg) });
  t.match(s2.store.lookup('j', 'f2'), { size: 2 });
  t.match(logs.join('\n'), /ignored 12 bytes/);
  await s2.close();

  const damaged = Buffer.from(good);
  damaged[20] = damaged[20]! ^ 0xff; // inside the first record, with valid records after it
  await writeFile(file, damaged);
  await t.rejects(KvsServer.open({ dataDir }), { code: 'DYAD_EIO', message: /corrupt at byte 0/ });
});

t.test('a data directory has one owner', async (t) => {
  const dataDir = await tempDir(t);
  const s1 = await KvsServer.open({ dataDir });
  t.teardown(() => s1.close());
  await t.rejects(KvsServer.open({ dataDir }), { name: 'ConfigError', message: /in use by process/ });
});

t.test('clients ride through a server restart', async (t) => {
  const dataDir = await tempDir(t);
  const s1 = await startKvsServer({ dataDir });
  const port = s1.address!.port;
  const secret = await s1.createNamespace('r');
  const consumer = await EmbeddedKvsClient.connect(s1.url, { secret, env: {}, reconnectMaxMs: 200 });
  t.teardown(() => consumer.close());
  const events: KvsWatchEvent[] = [];
  let onChange: (() => void) | undefined;
  await consumer.watch('r', (ev) => {
    events.push(ev);
    if (ev.type === 'change') onChange?.();
  });
  const pending = consumer.wait('r', 'after/restart');
  await consumer.lookup('r', 'after/restart'); // the wait is registered on the server

  await s1.close();
  const whileDown = consumer.publish('r', 'written/while-down', rec(7));
  const s2 = await KvsServer.open({ dataDir });
  t.teardown(() => s2.close());
  await s2.listen('127.0.0.1', port);

  t.match(await whileDown, { size: 7 }, 'a publish issued while the server was down is resent');
  // Requests go out in order after the reconnect, so the wait is armed again by now.
  await consumer.lookup('r', 'nothing');
  const sawChange = new Promise<void>((resolve) => (onChange = resolve));
  const producer = await EmbeddedKvsClient.connect(s2.url, { secret, env: {} });
  t.teardown(() => producer.close());
  const published = await producer.publish('r', 'after/restart', rec(9));
  t.same(await pending, published, 'the pending wait resolves after the restart');
  await sawChange;
  const types = events.map((e) => e.type);
  t.equal(types[0], 'reset', 'watchers are told they may have missed events');
  t.ok(types.includes('change'), 'and events resume on the new connection');
});
