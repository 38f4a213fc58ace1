/**
 * Deferred replies and interrupts: a request a handler answers later must
 * not hold up any other request, and a caller's signal must cancel it with
 * EINTR. Also: FORGET frees the daemon's nodes.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { MirrorFs, type Node } from '../src/dmd/mirror.js';
import type { Caller } from '../src/fuse/caller.js';
import type { Entry, Refusal, RequestContext } from '../src/fuse/types.js';
import { DyadError, errnos } from '../src/errors.js';
import { serveInProcess } from './helpers/inprocess.js';
import { cFixture, sh } from './helpers/mount.js';

/** Holds LOOKUPs of names starting with "slow" until released or interrupted. */
class SlowFs extends MirrorFs {
  held: Array<{ name: string; release: () => void }> = [];
  interrupted: string[] = [];
  protected override lookupMissing(ctx: RequestContext, dir: Node, name: string, caller: Caller): Entry | Refusal | Promise<Entry | Refusal> {
    if (!name.startsWith('slow')) return super.lookupMissing(ctx, dir, name, caller);
    return new Promise<Entry>((resolve, reject) => {
      const fail = () => reject(new DyadError('DYAD_ENOENT', errnos.ENOENT, name));
      this.held.push({ name, release: fail });
      ctx.signal.addEventListener('abort', () => {
        this.interrupted.push(name);
        reject(new DyadError('DYAD_EINTR', errnos.EINTR, `${name}: interrupted`));
      });
    });
  }
}

const until = async (cond: () => boolean, what: string) => {
  for (let i = 0; i < 1000 && !cond(); i++) await new Promise((r) => setTimeout(r, 10));
  if (!cond()) throw new Error(`timed out waiting for ${what}`);
};

t.test('a deferred reply does not delay other requests', async (t) => {
  const m = await serveInProcess(t, (s, o) => new SlowFs(s, o));
  fs.writeFileSync(path.join(m.storage, 'a.txt'), 'A');
  const order: string[] = [];
  const slow = sh(`cat ${path.join(m.mnt, 'slow1')}`).then((r) => {
    order.push('slow');
    return r;
  });
  await until(() => m.fs.held.length === 1, 'the slow lookup to arrive');
  t.equal(m.server.session?.pendingCount, 1, 'one request pending');
  fs.mkdirSync(path.join(m.storage, 'sub'));
  for (let i = 0; i < 20; i++) {
    // Creates go to another directory: the kernel itself holds the parent
    // directory's lock while a LOOKUP in it is pending (see docs/SEMANTICS.md).
    const r = await sh(`cat ${path.join(m.mnt, 'a.txt')}; ls ${m.mnt} >/dev/null; echo x > ${path.join(m.mnt, 'sub', `w${i}`)}`, { timeoutMs: 20_000 });
    t.equal(r.stdout, 'A');
  }
  order.push('others');
  m.fs.held[0]!.release();
  const r = await slow;
  t.same(order, ['others', 'slow'], 'other requests finished while one was pending');
  t.match(r.stderr, /No such file/, 'the deferred reply arrives when released');
  t.equal(m.server.session?.pendingCount, 0);
});

t.test('an interrupted pending request returns EINTR', async (t) => {
  const m = await serveInProcess(t, (s, o) => new SlowFs(s, o));
  const r = await sh(`${cFixture('open_intr')} ${path.join(m.mnt, 'slow2')} 1`);
  t.equal(r.stdout.trim(), 'EINTR', 'open failed with EINTR');
  t.same(m.fs.interrupted, ['slow2'], 'the handler saw the interrupt');
  t.equal(m.server.session?.pendingCount, 0, 'nothing left pending');

  // Ctrl-C (SIGINT) on a waiting program ends only that wait.
  const child = spawn('cat', [path.join(m.mnt, 'slow3')]);
  await until(() => m.fs.held.some((h) => h.name === 'slow3'), 'slow3 to wait');
  const other = spawn('cat', [path.join(m.mnt, 'slow4')]);
  await until(() => m.fs.held.some((h) => h.name === 'slow4'), 'slow4 to wait');
  child.kill('SIGINT');
  await new Promise((res) => child.on('exit', res));
  await until(() => m.fs.interrupted.includes('slow3'), 'the interrupt');
  t.equal(m.server.session?.pendingCount, 1, 'the other wait goes on');
  m.fs.held.find((h) => h.name === 'slow4')!.release();
  await new Promise((res) => other.on('exit', res));
  t.equal(m.server.session?.pendingCount, 0);
});

t.test('FORGET frees nodes: memory stays flat over many distinct lookups', async (t) => {
  const m = await serveInProcess(t, (s, o) => new MirrorFs(s, o));
  const n = 20_000;
  fs.mkdirSync(path.join(m.storage, 'many'));
  for (let i = 0; i < n; i++) fs.writeFileSync(path.join(m.storage, 'many', `f${i}`), '');
  const script = `import os\nfor i in range(${n}): os.stat(${JSON.stringify(path.join(m.mnt, 'many'))} + '/f%d' % i)\n`;
  fs.writeFileSync(path.join(m.storage, '..', 's.py'), script);
  const r = await sh(`python3 ${path.join(m.storage, '..', 's.py')}`);
  t.equal(r.code, 0, r.stderr);
  t.ok(m.fs.nodeCount > n, `one node per looked-up file (${m.fs.nodeCount})`);
  // Make the kernel drop its dentries and inodes: it FORGETs each node.
  for (let i = 0; i < 50 && m.fs.nodeCount > 100; i++) {
    fs.writeFileSync('/proc/sys/vm/drop_caches', '2');
    await new Promise((res) => setTimeout(res, 100));
  }
  t.ok(m.fs.nodeCount < 100, `nodes freed after the kernel forgot them (${m.fs.nodeCount} left)`);
});
