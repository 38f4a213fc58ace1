/**
 * The embedded server's security and robustness over real loopback sockets:
 * secret files and modes, per-namespace challenge-response (both directions),
 * the admin scope, and connections that break the protocol being closed without
 * disturbing the others.
 */
import { chmod, mkdtemp, rm, stat, writeFile, readFile } from 'node:fs/promises';
import { createServer, connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { authProof } from '../src/kvs/embedded/auth.js';
import { encodeFrame, FrameDecoder, PROTOCOL } from '../src/kvs/embedded/protocol.js';
import { EmbeddedKvsClient, openKvs, secretPath, startKvsServer, type KvsServer, type PublishInput } from '../src/kvs/index.js';

const file: PublishInput = { owner: 0, size: 1, mode: 0o100644, mtimeMs: 0, digest: '' };

/** Anything tap can hand cleanup to (the root or a subtest). */
interface Scope {
  teardown(fn: () => unknown): void;
}

async function server(t: Scope, opts: Parameters<typeof startKvsServer>[0] = {}): Promise<{ server: KvsServer; dataDir: string }> {
  const dataDir = await mkdtemp(join(tmpdir(), 'kvs-srv-'));
  const s = await startKvsServer({ dataDir, ...opts });
  t.teardown(async () => {
    await s.close();
    await rm(dataDir, { recursive: true, force: true });
  });
  return { server: s, dataDir };
}

/** A hand-driven protocol connection. */
interface Raw {
  socket: Socket;
  next(): Promise<Record<string, unknown>>;
  send(msg: object): void;
  closed: Promise<void>;
}

function raw(port: number): Promise<Raw> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: '127.0.0.1', port });
    const decoder = new FrameDecoder(1 << 24);
    const queue: Array<Record<string, unknown>> = [];
    const waiting: Array<(m: Record<string, unknown>) => void> = [];
    const closed = new Promise<void>((res) => socket.on('close', () => res()));
    socket.on('error', () => undefined);
    socket.on('data', (chunk: Buffer) => {
      for (const m of decoder.push(chunk) as Array<Record<string, unknown>>) {
        const w = waiting.shift();
        if (w) w(m);
        else queue.push(m);
      }
    });
    socket.once('connect', () =>
      resolve({
        socket,
        next: () => new Promise((res) => (queue.length > 0 ? res(queue.shift()!) : waiting.push(res))),
        send: (msg) => socket.write(encodeFrame(msg)),
        closed,
      }),
    );
    socket.once('error', reject);
  });
}

const cnonce = 'c'.repeat(64);

t.test('secret files and modes', async (t) => {
  const { server: s, dataDir } = await server(t);
  t.equal((await stat(dataDir)).mode & 0o777, 0o700);
  t.equal((await stat(join(dataDir, 'admin.secret'))).mode & 0o777, 0o600);
  t.equal((await stat(join(dataDir, 'kvs.journal'))).mode & 0o777, 0o600);
  t.equal((await readFile(join(dataDir, 'admin.secret'), 'utf8')).trim(), s.adminSecret);
  const secret = await s.createNamespace('job');
  t.match(secret, /^[0-9a-f]{64}$/);
  const f = secretPath(join(dataDir, 'secrets'), 'job');
  t.equal(s.secretFileOf('job'), f);
  t.equal((await stat(f)).mode & 0o777, 0o600);
  t.equal((await readFile(f, 'utf8')).trim(), secret);
  await s.removeNamespace('job');
  await t.rejects(stat(f), { code: 'ENOENT' }, 'removing the namespace removes its secret file');
});

t.test('per-namespace authentication', async (t) => {
  const { server: s, dataDir } = await server(t);
  const secret = await s.createNamespace('job');
  const other = await s.createNamespace('other');
  const use = async (opts: Parameters<typeof openKvs>[1]): Promise<Awaited<ReturnType<typeof openKvs>>> => {
    const kvs = await openKvs(s.url, { env: {}, ...opts });
    t.teardown(() => kvs.close());
    return kvs;
  };

  const byValue = await use({ secret });
  await byValue.publish('job', 'a', file);
  t.match(await byValue.lookup('job', 'a'), { kind: 'file' });
  await t.rejects(byValue.lookup('other', 'a'), { code: 'DYAD_EACCES' }, 'one namespace secret does not open another');

  t.match(await (await use({ env: { DYAD_SECRET: secret } })).lookup('job', 'a'), { kind: 'file' }, 'DYAD_SECRET');
  const secretFile = join(dataDir, 'copy.secret');
  await writeFile(secretFile, `${other}\n`, { mode: 0o600 });
  t.equal(await (await use({ env: { DYAD_SECRET_FILE: secretFile } })).lookup('other', 'x'), undefined, 'DYAD_SECRET_FILE');
  t.equal(await (await use({ secretDir: join(dataDir, 'secrets') })).lookup('other', 'x'), undefined, 'secretDir');

  await t.rejects((await use({ secret: other })).lookup('job', 'a'), { code: 'DYAD_EACCES', message: /wrong secret/ });
  await t.rejects((await use({})).lookup('job', 'a'), { code: 'DYAD_ECONFIG', message: /DYAD_SECRET/ });
  await chmod(secretFile, 0o644);
  await t.rejects((await use({ secretFile })).lookup('other', 'a'), { code: 'DYAD_ECONFIG', message: /chmod 600/ });
  await t.rejects(openKvs(s.url, { secret: 'not-hex' }), { code: 'DYAD_ECONFIG' });

  const plain = await use({ secret });
  t.equal(await plain.hasNamespace('other'), true, 'hasNamespace needs no secret');
  await t.rejects(plain.createNamespace('new'), { code: 'DYAD_EACCES', message: /admin secret/ });
  await t.rejects(plain.listNamespaces(), { code: 'DYAD_EACCES' });

  // The admin can create a namespace with a chosen secret (DYAD_SECRET), handed to clients out of band.
  const chosen = 'ab'.repeat(32);
  const admin = await EmbeddedKvsClient.connect(s.url, { adminSecret: s.adminSecret, secret: chosen, env: {} });
  t.teardown(() => admin.close());
  await admin.createNamespace('chosen');
  t.equal(await (await use({ secret: chosen })).lookup('chosen', 'x'), undefined);
  await t.rejects((await use({ adminSecret: 'cd'.repeat(32) })).listNamespaces(), { code: 'DYAD_EACCES' });

  // A removed and recreated namespace has a new secret; old grants do not survive.
  await admin.removeNamespace('job');
  await admin.createNamespace('job', { secret: 'ef'.repeat(32) });
  await t.rejects(byValue.lookup('job', 'a'), { code: 'DYAD_EACCES' });
});

t.test('client rejects a server that cannot prove the secret', async (t) => {
  const fake = createServer((sock) => {
    const decoder = new FrameDecoder(1 << 20);
    sock.write(encodeFrame({ hello: PROTOCOL, nonce: 'a'.repeat(64), keyDepth: 3, keyBins: 1024 }));
    sock.on('data', (chunk: Buffer) => {
      for (const m of decoder.push(chunk) as Array<{ id: number }>) sock.write(encodeFrame({ id: m.id, ok: true, res: { mac: '0'.repeat(64) } }));
    });
    sock.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => fake.listen(0, '127.0.0.1', resolve));
  t.teardown(() => new Promise<void>((resolve) => fake.close(() => resolve())));
  const port = (fake.address() as { port: number }).port;
  const kvs = await openKvs(`dyad://127.0.0.1:${port}`, { secret: '12'.repeat(32), env: {} });
  t.teardown(() => kvs.close());
  await t.rejects(kvs.lookup('job', 'a'), { code: 'DYAD_EACCES', message: /could not prove/ });
});

t.test('bad frames close only their own connection', async (t) => {
  const { server: s } = await server(t);
  const secret = await s.createNamespace('job');
  const port = s.address!.port;
  const good = await openKvs(s.url, { secret, env: {} });
  t.teardown(() => good.close());
  const pending = good.wait('job', 'later');
  await good.lookup('job', 'later');

  const oversized = await raw(port);
  await oversized.next(); // hello
  const header = Buffer.alloc(4);
  header.writeUInt32BE(2 << 20);
  oversized.socket.write(header);
  await oversized.closed;
  t.pass('frame over 1 MiB: closed from its header');

  const notJson = await raw(port);
  await notJson.next();
  const junk = Buffer.from('{nope');
  const len = Buffer.alloc(4);
  len.writeUInt32BE(junk.length);
  notJson.socket.write(Buffer.concat([len, junk]));
  await notJson.closed;
  t.pass('invalid JSON: closed');

  const noId = await raw(port);
  await noId.next();
  noId.send({ op: 'ping' });
  await noId.closed;
  t.pass('request without id: closed');

  const polite = await raw(port);
  await polite.next();
  polite.send({ id: 1, op: 'frobnicate' });
  t.match(await polite.next(), { id: 1, ok: false, err: { code: 'DYAD_EINVAL', errno: 'EINVAL' } }, 'unknown op is an error reply');
  polite.send({ id: 2, op: 'lookup', ns: 'job', path: 'x' });
  t.match(await polite.next(), { id: 2, ok: false, err: { code: 'DYAD_EACCES' } }, 'data before auth is refused');
  polite.send({ id: 3, op: 'ping' });
  t.match(await polite.next(), { id: 3, ok: true }, 'connection still open');
  polite.socket.destroy();

  const writer = await openKvs(s.url, { secret, env: {} });
  t.teardown(() => writer.close());
  await writer.publish('job', 'later', file);
  t.match(await pending, { kind: 'file' }, 'a pending wait on another connection is unaffected');
});

t.test('authentication limits', async (t) => {
  const { server: impatient } = await server(t, { limits: { authTimeoutMs: 100 } });
  const idle = await raw(impatient.address!.port);
  t.match(await idle.next(), { hello: PROTOCOL, keyDepth: 3, keyBins: 1024 });
  await idle.closed;
  t.pass('a connection that never authenticates is dropped');

  const { server: s } = await server(t);
  await s.createNamespace('job');
  const port = s.address!.port;

  const guesser = await raw(port);
  const hello = await guesser.next();
  for (let i = 1; i <= 5; i++) guesser.send({ id: i, op: 'auth', ns: 'job', cnonce, mac: 'f'.repeat(64) });
  for (let i = 1; i <= 5; i++) t.match(await guesser.next(), { id: i, ok: false, err: { code: 'DYAD_EACCES' } });
  await guesser.closed;
  t.pass('five failed attempts close the connection');

  const ok = await raw(port);
  const h = await ok.next();
  const secret = s.store.namespaceSecret('job');
  ok.send({ id: 1, op: 'auth', ns: 'job', cnonce, mac: authProof(secret, 'client', 'ns:job', h['nonce'] as string, cnonce) });
  const reply = await ok.next();
  t.match(reply, { id: 1, ok: true });
  t.equal((reply['res'] as { mac: string }).mac, authProof(secret, 'server', 'ns:job', h['nonce'] as string, cnonce), 'server proves the secret');
  t.not(h['nonce'], hello['nonce'], 'fresh nonce per connection');
  ok.socket.destroy();
});

t.test('openKvs URLs', async (t) => {
  await t.rejects(openKvs('etcd://127.0.0.1:1', { connectTimeoutMs: 200, env: {} }), { code: 'DYAD_ECONNREFUSED', message: /127\.0\.0\.1:1/ });
  await t.rejects(openKvs('redis://x:1'), { name: 'ConfigError', message: /redis:\/\/x:1/ });
  await t.rejects(openKvs('dyad://localhost'), { name: 'ConfigError', message: /dyad:\/\/HOST:PORT/ });
  const { server: s } = await server(t);
  t.match(s.url, /^dyad:\/\/127\.0\.0\.1:\d+$/);
  t.not(s.address!.port, 0, 'port 0 reports the bound port');
  await t.rejects(startKvsServer({ port: s.address!.port }), { name: 'ConfigError', message: /cannot listen/ });
  await t.rejects(startKvsServer({ env: { DYAD_KEY_BINS: '0' } }), { name: 'ConfigError', message: /DYAD_KEY_BINS=0/ });
  const gone = await startKvsServer({});
  const url = gone.url;
  await gone.close();
  await t.rejects(openKvs(url, { connectTimeoutMs: 200, env: {} }), { code: 'DYAD_ECONNREFUSED', message: new RegExp(url) });
});
