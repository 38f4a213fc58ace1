/**
 * Caller intent at LOOKUP: for a name missing from storage the daemon must
 * tell a reader from a creator from a probe, whatever program asks.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import diagnostics from 'node:diagnostics_channel';
import { MirrorFs } from '../src/dmd/mirror.js';
import type { CallerKind } from '../src/fuse/caller.js';
import { serveInProcess } from './helpers/inprocess.js';
import { cFixture, sh, tmpdir } from './helpers/mount.js';

t.test('intent of each kind of caller', async (t) => {
  const m = await serveInProcess(t, (s, o) => new MirrorFs(s, o));
  const seen: Array<{ path: string; kind: CallerKind }> = [];
  const onMissing = (msg: unknown) => {
    const e = msg as { path: string; caller: { kind: CallerKind } };
    seen.push({ path: e.path, kind: e.caller.kind });
  };
  diagnostics.subscribe('dyad-fs:dmd:missing', onMissing);
  t.teardown(() => diagnostics.unsubscribe('dyad-fs:dmd:missing', onMissing));
  const P = (p: string) => path.join(m.mnt, p);
  const kindOf = async (name: string, cmd: string): Promise<CallerKind | undefined> => {
    seen.length = 0;
    await sh(cmd);
    return seen.find((s) => s.path === name)?.kind;
  };
  const py = tmpdir(t);
  const script = (name: string, body: string) => {
    const f = path.join(py, name);
    fs.writeFileSync(f, body);
    return f;
  };
  const intent = cFixture('intent');

  t.equal(await kindOf('c1', `cat ${P('c1')}`), 'open', 'cat: reader');
  t.equal(await kindOf('t1', `touch ${P('t1')}`), 'create', 'touch: create');
  t.equal(await kindOf('s1', `stat ${P('s1')}`), 'probe', 'stat: probe');
  t.equal(await kindOf('l1', `ls ${P('l1')}`), 'probe', 'ls: probe');
  t.equal(await kindOf('a1', `test -e ${P('a1')}`), 'probe', 'test -e: probe');
  t.equal(await kindOf('w1', `python3 ${script('w.py', `open(${JSON.stringify(P('w1'))}, 'w').close()`)}`), 'create', "Python open 'w'");
  t.equal(await kindOf('x1', `python3 ${script('x.py', `open(${JSON.stringify(P('x1'))}, 'x').close()`)}`), 'create', "Python open 'x'");
  t.equal(
    await kindOf('r1', `python3 ${script('r.py', `
import threading
def f():
    try: open(${JSON.stringify(P('r1'))}).close()
    except FileNotFoundError: pass
th = threading.Thread(target=f); th.start(); th.join()`)}`),
    'open',
    'Python open from a non-main thread: reader',
  );
  t.equal(await kindOf('th1', `${intent} thread-read ${P('th1')}`), 'open', 'C open from a second thread: reader');
  t.equal(await kindOf('o2r', `${intent} openat2-read ${P('o2r')}`), 'open', 'openat2 without O_CREAT: reader');
  t.equal(await kindOf('o2c', `${intent} openat2-creat ${P('o2c')}`), 'create', 'openat2 with O_CREAT: create');
  t.equal(await kindOf('d1', `mkdir ${P('d1')}`), 'create', 'mkdir: create');
  t.equal(await kindOf('sl1', `ln -s x ${P('sl1')}`), 'create', 'symlink: create');
  t.equal(await kindOf('mv1', `mv ${P('t1')} ${P('mv1')}`), 'create', 'rename target: create');
  t.equal(await kindOf('sub/f', `mkdir ${P('sub')}; cat ${P('sub/f')}`), 'open', 'reader in a subdirectory');
  t.equal(await kindOf('nodir', `cat ${P('nodir/f')}`), 'open', 'a missing directory on a reader\'s path: reader');
  t.ok(fs.existsSync(path.join(m.storage, 'w1')), 'creates went through');
});
