/**
 * POSIX behaviour of a plain mount (no KVS): the mount must act like its
 * storage directory, with kernel passthrough on and off. Every check runs
 * against a real mount made by the real dyad-mount CLI, and checks the
 * storage underneath too.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { mountCli, sh, tmpdir } from './helpers/mount.js';

for (const mode of ['auto', 'off'] as const) {
  t.test(`POSIX mirror, passthrough ${mode}`, async (t) => {
    const base = tmpdir(t);
    const mnt = path.join(base, 'mnt');
    const storage = path.join(base, 'storage');
    fs.mkdirSync(mnt);
    fs.mkdirSync(storage);
    const m = await mountCli(t, mnt, ['--storage', storage, '--passthrough', mode]);
    const log = fs.readFileSync(m.log, 'utf8');
    t.match(log, mode === 'auto' ? /passthrough on/ : /passthrough off/, 'start log names the I/O mode');
    const P = (p: string) => path.join(mnt, p);
    const S = (p: string) => path.join(storage, p);

    t.test('create, write, read, append', async (t) => {
      fs.writeFileSync(P('a.txt'), 'hello');
      t.equal(fs.readFileSync(P('a.txt'), 'utf8'), 'hello');
      t.equal(fs.readFileSync(S('a.txt'), 'utf8'), 'hello', 'bytes land in storage');
      fs.appendFileSync(P('a.txt'), ' world');
      t.equal(fs.readFileSync(P('a.txt'), 'utf8'), 'hello world');
      const fd = fs.openSync(P('a.txt'), 'a');
      fs.writeSync(fd, '!', 0); // O_APPEND wins over the position
      fs.closeSync(fd);
      t.equal(fs.readFileSync(P('a.txt'), 'utf8'), 'hello world!');
    });

    t.test('truncate and O_TRUNC', async (t) => {
      fs.writeFileSync(P('t.bin'), Buffer.alloc(10_000, 7));
      fs.truncateSync(P('t.bin'), 100);
      t.equal(fs.statSync(P('t.bin')).size, 100);
      t.equal(fs.statSync(S('t.bin')).size, 100);
      fs.truncateSync(P('t.bin'), 5000);
      const b = fs.readFileSync(P('t.bin'));
      t.equal(b[99], 7);
      t.equal(b[100], 0, 'extension reads zeros');
      fs.writeFileSync(P('t.bin'), 'x');
      t.equal(fs.readFileSync(P('t.bin'), 'utf8'), 'x', 'open with O_TRUNC');
      const fd = fs.openSync(P('t.bin'), 'r+');
      fs.ftruncateSync(fd, 0);
      fs.closeSync(fd);
      t.equal(fs.statSync(P('t.bin')).size, 0);
    });

    t.test('rename, including over an existing file', async (t) => {
      fs.writeFileSync(P('r1'), 'one');
      fs.writeFileSync(P('r2'), 'two');
      fs.renameSync(P('r1'), P('r2'));
      t.equal(fs.readFileSync(P('r2'), 'utf8'), 'one');
      t.notOk(fs.existsSync(P('r1')));
      fs.mkdirSync(P('rd'));
      fs.renameSync(P('r2'), P('rd/r3'));
      t.equal(fs.readFileSync(P('rd/r3'), 'utf8'), 'one');
      fs.renameSync(P('rd'), P('rd2'));
      t.equal(fs.readFileSync(P('rd2/r3'), 'utf8'), 'one', 'children follow a renamed directory');
      t.equal(fs.readFileSync(S('rd2/r3'), 'utf8'), 'one');
      const r = await sh(`mv -n ${P('rd2/r3')} ${P('a.txt')}; cat ${P('a.txt')}`);
      t.equal(r.stdout, 'hello world!', 'mv -n does not replace');
    });

    t.test('unlink while open', async (t) => {
      fs.writeFileSync(P('u.txt'), 'still here');
      const fd = fs.openSync(P('u.txt'), 'r+');
      fs.unlinkSync(P('u.txt'));
      t.notOk(fs.existsSync(P('u.txt')));
      t.notOk(fs.existsSync(S('u.txt')));
      const buf = Buffer.alloc(10);
      t.equal(fs.readSync(fd, buf, 0, 10, 0), 10);
      t.equal(buf.toString(), 'still here');
      fs.writeSync(fd, 'STILL', 0, 'utf8');
      t.equal(fs.fstatSync(fd).size, 10, 'fstat of an unlinked open file');
      fs.closeSync(fd);
    });

    t.test('mkdir, readdir of a large directory, rmdir', async (t) => {
      fs.mkdirSync(P('big'));
      const n = 3000;
      for (let i = 0; i < n; i++) fs.writeFileSync(P(`big/f${i}`), String(i));
      const names = fs.readdirSync(P('big'));
      t.equal(names.length, n, 'every entry listed once');
      t.equal(new Set(names).size, n);
      const r = await sh(`ls -l ${P('big')} | wc -l`);
      t.equal(Number(r.stdout.trim()), n + 1, 'ls -l sees them all (READDIRPLUS)');
      t.equal(fs.readFileSync(P('big/f2999'), 'utf8'), '2999');
      t.throws(() => fs.rmdirSync(P('big')), { code: 'ENOTEMPTY' });
      for (let i = 0; i < n; i++) fs.unlinkSync(P(`big/f${i}`));
      fs.rmdirSync(P('big'));
      t.notOk(fs.existsSync(S('big')));
      t.throws(() => fs.mkdirSync(P('a.txt')), { code: 'EEXIST' });
    });

    t.test('symlink and hard link', async (t) => {
      fs.symlinkSync('a.txt', P('sl'));
      t.equal(fs.readlinkSync(P('sl')), 'a.txt');
      t.equal(fs.readFileSync(P('sl'), 'utf8'), 'hello world!');
      t.ok(fs.lstatSync(S('sl')).isSymbolicLink());
      fs.linkSync(P('a.txt'), P('hl'));
      const a = fs.statSync(P('a.txt'));
      const h = fs.statSync(P('hl'));
      t.equal(h.ino, a.ino, 'one inode for both names');
      t.equal(h.nlink, 2);
      fs.appendFileSync(P('hl'), '?');
      t.equal(fs.readFileSync(P('a.txt'), 'utf8'), 'hello world!?');
      fs.unlinkSync(P('hl'));
      t.equal(fs.statSync(P('a.txt')).nlink, 1);
    });

    t.test('stat and listings give the storage\'s inode numbers, on every page of a large directory', async (t) => {
      fs.mkdirSync(P('many'));
      for (let i = 0; i < 300; i++) fs.writeFileSync(P(`many/f${i}`), '');
      fs.mkdirSync(P('many/sub'));
      fs.symlinkSync('f0', P('many/ln'));
      t.equal(fs.statSync(P('a.txt')).ino, fs.statSync(S('a.txt')).ino, 'stat');
      // os.scandir reports getdents' d_ino. After the first page the kernel
      // asks with plain READDIR, whose entries carry no attributes.
      const r = await sh(`python3 -c 'import os; [print(e.name, e.inode(), "d" if e.is_dir(follow_symlinks=False) else "l" if e.is_symlink() else "f") for e in os.scandir("${P('many')}")]'`);
      const listed = r.stdout.trim().split('\n').map((l) => l.split(' '));
      t.equal(listed.length, 302, r.stderr);
      const wrong = listed.filter(([name, ino]) => Number(ino) !== fs.lstatSync(S(`many/${name}`)).ino);
      t.same(wrong, [], 'every entry\'s d_ino is the storage\'s');
      const types = Object.fromEntries(listed.map(([name, , type]) => [name, type]));
      t.same([types['sub'], types['ln'], types['f7']], ['d', 'l', 'f'], 'and its type');
    });

    t.test('chmod and utimens with nanoseconds', async (t) => {
      fs.chmodSync(P('a.txt'), 0o640);
      t.equal(fs.statSync(P('a.txt')).mode & 0o7777, 0o640);
      t.equal(fs.statSync(S('a.txt')).mode & 0o7777, 0o640);
      const r = await sh(`touch -d '2020-01-02 03:04:05.123456789' ${P('a.txt')} && stat -c %y ${P('a.txt')}`);
      t.match(r.stdout, /2020-01-02 03:04:05\.123456789/);
      const s = await sh(`stat -c %y ${S('a.txt')}`);
      t.match(s.stdout, /2020-01-02 03:04:05\.123456789/, 'storage has the same time');
      const m = await sh(`touch -m -d '2021-05-06 07:08:09' ${P('a.txt')} && stat -c '%x|%y' ${P('a.txt')}`);
      t.match(m.stdout, /^2020-01-02 03:04:05\.123456789.*\|2021-05-06 07:08:09\.0+/, 'mtime only leaves atime');
    });

    t.test('statfs and fsync', async (t) => {
      const a = fs.statfsSync(mnt);
      const b = fs.statfsSync(storage);
      t.equal(a.bsize, b.bsize);
      t.equal(a.blocks, b.blocks);
      const fd = fs.openSync(P('sync.bin'), 'w');
      fs.writeSync(fd, Buffer.alloc(1 << 16, 1));
      fs.fsyncSync(fd);
      fs.fdatasyncSync(fd);
      fs.closeSync(fd);
      t.equal(fs.statSync(S('sync.bin')).size, 1 << 16);
    });

    t.test('O_EXCL', async (t) => {
      fs.writeFileSync(P('x1'), 'x', { flag: 'wx' });
      t.throws(() => fs.writeFileSync(P('x1'), 'y', { flag: 'wx' }), { code: 'EEXIST' });
      t.equal(fs.readFileSync(P('x1'), 'utf8'), 'x');
    });

    t.test('mmap read and write', async (t) => {
      fs.writeFileSync(P('mm.bin'), Buffer.alloc(8192, 0x61));
      const py = `
import mmap, os
fd = os.open(${JSON.stringify(P('mm.bin'))}, os.O_RDWR)
m = mmap.mmap(fd, 8192)
assert m[0:4] == b'aaaa', m[0:4]
m[4096:4101] = b'MMAPW'
m.flush(); m.close(); os.close(fd)
print('ok')`;
      const script = path.join(base, 'mm.py');
      fs.writeFileSync(script, py);
      const r = await sh(`python3 ${script}`);
      t.equal(r.stdout.trim(), 'ok', r.stderr);
      const b = fs.readFileSync(S('mm.bin'));
      t.equal(b.subarray(4096, 4101).toString(), 'MMAPW', 'mmap write reached storage');
      t.equal(fs.readFileSync(P('mm.bin')).subarray(4096, 4101).toString(), 'MMAPW');
    });

    t.test('sparse file beyond 4 GiB', async (t) => {
      const off = 5 * 1024 ** 3 + 123;
      const fd = fs.openSync(P('sparse'), 'w+');
      fs.writeSync(fd, 'tail', 0, 'utf8');
      fs.writeSync(fd, 'far', off, 'utf8');
      const buf = Buffer.alloc(3);
      fs.readSync(fd, buf, 0, 3, off);
      fs.closeSync(fd);
      t.equal(buf.toString(), 'far');
      const st = fs.statSync(P('sparse'));
      t.equal(st.size, off + 3);
      t.ok(st.blocks * 512 < 1024 * 1024, 'holes stay holes');
      const r = await sh(`dd if=${P('sparse')} bs=1 skip=${off} count=3 status=none`);
      t.equal(r.stdout, 'far');
      const seek = await sh(`python3 -c "import os; fd=os.open('${P('sparse')}', os.O_RDONLY); print(os.lseek(fd, 4096, os.SEEK_DATA))"`);
      t.equal(Number(seek.stdout.trim()) >= 4096, true, `SEEK_DATA skips the hole: ${seek.stdout}${seek.stderr}`);
      const hole = await sh(`python3 -c "import os; fd=os.open('${P('sparse')}', os.O_RDONLY); print(os.lseek(fd, 0, os.SEEK_HOLE))"`);
      t.ok(Number(hole.stdout.trim()) < off, `SEEK_HOLE finds the hole before the far bytes: ${hole.stdout}${hole.stderr}`);
      fs.unlinkSync(P('sparse'));
    });

    t.test('fallocate', async (t) => {
      const r = await sh(`fallocate -l 1M ${P('fa.bin')} && stat -c %s ${P('fa.bin')}`);
      t.equal(r.stdout.trim(), '1048576', r.stderr);
    });

    t.test('concurrent readers and writers', async (t) => {
      const workers = 4;
      const size = 4 << 20;
      const code = `
const { workerData, parentPort } = require('node:worker_threads');
const fs = require('node:fs');
const { file, i, size } = workerData;
const buf = Buffer.alloc(size, i + 1);
fs.writeFileSync(file, buf);
let ok = true;
for (let r = 0; r < 5; r++) { const b = fs.readFileSync(file); if (!b.equals(buf)) ok = false; }
parentPort.postMessage(ok);`;
      const results = await Promise.all(
        Array.from({ length: workers }, (_, i) =>
          new Promise<boolean>((resolve, reject) => {
            const w = new Worker(code, { eval: true, workerData: { file: P(`cc${i}`), i, size } });
            w.once('message', resolve);
            w.once('error', reject);
          }),
        ),
      );
      t.same(results, Array(workers).fill(true), 'each worker reads back its own bytes');
      const shared = P('shared.bin');
      fs.writeFileSync(shared, Buffer.alloc(size, 9));
      const readers = await Promise.all(Array.from({ length: 6 }, () => fs.promises.readFile(shared)));
      t.ok(readers.every((b) => b.length === size && b[size - 1] === 9), 'parallel readers of one file');
    });

    t.test('errors match the storage', async (t) => {
      t.throws(() => fs.statSync(P('nope')), { code: 'ENOENT' });
      t.throws(() => fs.unlinkSync(P('nope')), { code: 'ENOENT' });
      t.throws(() => fs.rmdirSync(P('a.txt')), { code: 'ENOTDIR' });
      t.throws(() => fs.readdirSync(P('a.txt')), { code: 'ENOTDIR' });
      // Python's OSError carries the errno: 95 is EOPNOTSUPP, 1 EPERM, 22 EINVAL.
      const errnoOf = async (code: string): Promise<string> => {
        const r = await sh(`python3 -c '${code.replaceAll("'", `'"'"'`)}'`);
        return r.stdout.trim() || r.stderr;
      };
      const tryErrno = (body: string): string => `import os, ctypes, stat\ntry:\n    ${body}\n    print("ok")\nexcept OSError as e:\n    print(e.errno)`;
      t.equal(await errnoOf(tryErrno(`os.getxattr("${P('a.txt')}", "user.x")`)), '95', 'getxattr: EOPNOTSUPP');
      t.equal(await errnoOf(tryErrno(`os.setxattr("${P('a.txt')}", "user.x", b"1")`)), '95', 'setxattr: EOPNOTSUPP');
      t.equal(await errnoOf(tryErrno(`os.mkfifo("${P('fifo')}")`)), '1', 'mknod of a FIFO: EPERM');
      t.equal(await errnoOf(tryErrno(`os.mknod("${P('plain')}", stat.S_IFREG | 0o600)`)), 'ok', 'mknod of a regular file works');
      t.ok(fs.statSync(S('plain')).isFile(), 'and lands in storage');
      fs.writeFileSync(P('x1'), '1');
      fs.writeFileSync(P('x2'), '2');
      // renameat2(AT_FDCWD, x1, AT_FDCWD, x2, RENAME_EXCHANGE)
      const exchange = `libc = ctypes.CDLL(None, use_errno=True)\n    if libc.renameat2(-100, b"${P('x1')}", -100, b"${P('x2')}", 2) != 0: raise OSError(ctypes.get_errno(), "renameat2")`;
      t.equal(await errnoOf(tryErrno(exchange)), '22', 'RENAME_EXCHANGE: EINVAL');
      t.equal(fs.readFileSync(S('x1'), 'utf8'), '1', 'nothing was exchanged');
    });
  });
}

t.test('--attr-timeout: changes made in storage behind the mount show at once with 0, late with the default 60 s', async (t) => {
  const base = tmpdir(t);
  const mount = async (name: string, args: string[]) => {
    const mnt = path.join(base, `${name}-mnt`);
    const storage = path.join(base, `${name}-storage`);
    fs.mkdirSync(mnt);
    fs.mkdirSync(storage);
    await mountCli(t, mnt, ['--storage', storage, ...args]);
    return { mnt, storage };
  };
  const fresh = await mount('fresh', ['--attr-timeout', '0']);
  const cached = await mount('cached', []);
  // stat(1), a program of its own, so nothing in this process caches.
  const statSize = async (p: string): Promise<string> => {
    const r = await sh(`timeout 10 stat -c %s ${p}`);
    return r.code === 0 ? r.stdout.trim() : r.stderr;
  };
  for (const m of [fresh, cached]) {
    fs.writeFileSync(path.join(m.storage, 'grows'), 'hello');
    fs.writeFileSync(path.join(m.storage, 'goes'), 'bye');
    // The first stat looks the names up: the kernel now holds them and their attributes.
    t.equal(await statSize(path.join(m.mnt, 'grows')), '5');
    t.equal(await statSize(path.join(m.mnt, 'goes')), '3');
    fs.appendFileSync(path.join(m.storage, 'grows'), ' world!');
    fs.unlinkSync(path.join(m.storage, 'goes'));
  }
  t.equal(await statSize(path.join(fresh.mnt, 'grows')), '12', '0: a size changed in storage is seen at once');
  t.match(await statSize(path.join(fresh.mnt, 'goes')), /No such file or directory/, '0: a name removed in storage is gone at once');
  // The whole test takes far less than 60 s, so the kernel still trusts what it cached.
  t.equal(await statSize(path.join(cached.mnt, 'grows')), '5', 'default: the cached size is shown');
  t.equal(await statSize(path.join(cached.mnt, 'goes')), '3', 'default: the cached name is shown');
});
