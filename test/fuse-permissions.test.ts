/**
 * Permissions for users other than root, on a root daemon's mount: the
 * same contract whether the daemon checks them itself (the default: it acts
 * as the caller in storage) or leaves them to the kernel
 * (--kernel-permissions). Two unprivileged users (uid 1001 and 1002, with
 * group 1003 shared when a test says so) run ordinary programs through
 * setpriv against a real mount.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { mountCli, sh, tmpdir } from './helpers/mount.js';

const ALICE = 1001;
const BOB = 1002;
const TEAM = 1003;

/** Runs a shell command line as `uid` (its group: the same number), with only the supplementary groups given. */
function as(uid: number, cmd: string, groups: number[] = []) {
  const g = groups.length ? `--groups=${groups.join(',')}` : '--clear-groups';
  return sh(`setpriv --reuid=${uid} --regid=${uid} ${g} -- bash -c ${JSON.stringify(cmd)}`);
}

const modes = [
  { name: 'daemon checks, passthrough on', args: [], log: /permissions checked by the daemon as each caller/ },
  { name: 'daemon checks, passthrough off', args: ['--passthrough', 'off'], log: /permissions checked by the daemon as each caller/ },
  { name: '--kernel-permissions', args: ['--kernel-permissions'], log: /permissions checked by the kernel/ },
];

for (const mode of modes) {
  t.test(`permissions: ${mode.name}`, async (t) => {
    const base = tmpdir(t);
    // The test users must reach the mount.
    fs.chmodSync(base, 0o755);
    const mnt = path.join(base, 'mnt');
    const storage = path.join(base, 'storage');
    fs.mkdirSync(mnt);
    fs.mkdirSync(storage);
    fs.chmodSync(storage, 0o1777);
    const m = await mountCli(t, mnt, ['--storage', storage, ...mode.args]);
    t.match(fs.readFileSync(m.log, 'utf8'), mode.log, 'the start line says who checks permissions');
    const P = (p: string) => path.join(mnt, p);
    const S = (p: string) => path.join(storage, p);

    t.test('what a user creates is theirs, in the mount and in storage', async (t) => {
      const r = await as(ALICE, `echo hi > ${P('a.txt')} && mkdir ${P('adir')} && ln -s a.txt ${P('alink')}`);
      t.equal(r.code, 0, r.stderr);
      for (const name of ['a.txt', 'adir']) {
        t.equal(fs.statSync(P(name)).uid, ALICE, `${name} through the mount`);
        t.equal(fs.statSync(S(name)).uid, ALICE, `${name} in storage`);
        t.equal(fs.statSync(S(name)).gid, ALICE, `${name}'s group in storage`);
      }
      t.equal(fs.lstatSync(S('alink')).uid, ALICE, 'a symlink too');
    });

    t.test('another user reads a 0644 file but cannot change it', async (t) => {
      t.equal((await as(BOB, `cat ${P('a.txt')}`)).stdout, 'hi\n');
      const append = await as(BOB, `echo more >> ${P('a.txt')}`);
      t.not(append.code, 0, 'append refused');
      t.match(append.stderr, /Permission denied/);
      t.not((await as(BOB, `truncate -s 0 ${P('a.txt')}`)).code, 0, 'truncate refused');
      t.not((await as(BOB, `chmod 666 ${P('a.txt')}`)).code, 0, 'chmod by another user refused');
      t.not((await as(BOB, `touch -d 2020-01-01 ${P('a.txt')}`)).code, 0, 'setting times of another user\'s file refused');
      t.not((await as(ALICE, `chown ${BOB} ${P('a.txt')}`)).code, 0, 'giving a file away refused');
      t.equal((await as(BOB, `test -w ${P('a.txt')} && echo yes || echo no`)).stdout, 'no\n', 'access(W_OK) says no');
      t.equal((await as(ALICE, `test -w ${P('a.txt')} && echo yes || echo no`)).stdout, 'yes\n', 'and yes to the owner');
      t.equal(fs.readFileSync(S('a.txt'), 'utf8'), 'hi\n', 'storage unchanged');
      t.equal(fs.statSync(S('a.txt')).mode & 0o777, 0o644);
    });

    t.test('truncate by path is refused while the file is open elsewhere', async (t) => {
      // Root holds it open: the daemon has a descriptor of its own on it.
      const fd = fs.openSync(P('a.txt'), 'r+');
      try {
        t.not((await as(BOB, `truncate -s 0 ${P('a.txt')}`)).code, 0);
        t.equal(fs.readFileSync(S('a.txt'), 'utf8'), 'hi\n');
      } finally {
        fs.closeSync(fd);
      }
    });

    t.test('root may still do anything but run a file nobody may run', async (t) => {
      fs.appendFileSync(P('a.txt'), 'root\n');
      t.equal(fs.readFileSync(S('a.txt'), 'utf8'), 'hi\nroot\n');
      fs.writeFileSync(P('plain.sh'), '#!/bin/sh\necho ran\n', { mode: 0o644 });
      t.match((await sh(`${P('plain.sh')}`)).stderr, /Permission denied/);
    });

    t.test('a sticky directory keeps others from removing a user\'s file', async (t) => {
      fs.mkdirSync(P('pub'));
      fs.chmodSync(P('pub'), 0o1777);
      t.equal((await as(ALICE, `echo x > ${P('pub/a')}`)).code, 0);
      t.not((await as(BOB, `rm -f ${P('pub/a')}`)).code, 0, 'rm by another user refused');
      t.not((await as(BOB, `mv ${P('pub/a')} ${P('pub/b')}`)).code, 0, 'rename by another user refused');
      t.ok(fs.existsSync(S('pub/a')), 'still in storage');
      t.equal((await as(ALICE, `rm ${P('pub/a')}`)).code, 0, 'its owner removes it');
      t.notOk(fs.existsSync(S('pub/a')));
    });

    t.test('a private directory hides what is in it, even names seen before', async (t) => {
      t.equal((await as(ALICE, `mkdir -m 700 ${P('priv')} && echo secret > ${P('priv/x')} && cat ${P('priv/x')}`)).stdout, 'secret\n');
      const cat = await as(BOB, `cat ${P('priv/x')}`);
      t.match(cat.stderr, /Permission denied/, 'read refused');
      t.match((await as(BOB, `ls ${P('priv')}`)).stderr, /Permission denied/, 'listing refused');
      t.match((await as(BOB, `stat ${P('priv/x')}`)).stderr, /Permission denied/, 'stat of a name the kernel has cached refused');
      t.not((await as(BOB, `echo y > ${P('priv/y')}`)).code, 0, 'create refused');
      t.notOk(fs.existsSync(S('priv/y')));
      t.not((await as(BOB, `cd ${P('priv')}`)).code, 0, 'chdir refused');
    });

    t.test('a directory made private later hides what was open to all', async (t) => {
      t.equal((await as(ALICE, `mkdir ${P('later')} && echo x > ${P('later/y')}`)).code, 0);
      t.equal((await as(BOB, `stat -c %s ${P('later/y')}`)).stdout, '2\n', 'open to all at first');
      t.equal((await as(ALICE, `chmod 700 ${P('later')}`)).code, 0);
      t.match((await as(BOB, `stat ${P('later/y')}`)).stderr, /Permission denied/, 'then refused');
      t.match((await as(BOB, `cat ${P('later/y')}`)).stderr, /Permission denied/);
      t.equal((await as(ALICE, `mv ${P('a.txt')} ${P('later/moved')} && mv ${P('later/moved')} ${P('a.txt')}`)).code, 0);
      t.equal((await as(ALICE, `mkdir ${P('open')} && echo z > ${P('open/z')} && mv ${P('open')} ${P('later/open')}`)).code, 0);
      t.match((await as(BOB, `stat ${P('later/open/z')}`)).stderr, /Permission denied/, 'a directory moved into it is hidden too');
      t.match((await as(BOB, `cat ${P('later/open/z')}`)).stderr, /Permission denied/);
    });

    t.test('supplementary groups count', async (t) => {
      t.equal((await as(ALICE, `echo g > ${P('team.txt')} && chgrp ${TEAM} ${P('team.txt')} && chmod 664 ${P('team.txt')}`, [TEAM])).code, 0);
      t.equal(fs.statSync(S('team.txt')).gid, TEAM, 'a member may give the file to the group');
      t.not((await as(BOB, `echo no >> ${P('team.txt')}`)).code, 0, 'not a member: refused');
      t.equal((await as(BOB, `echo yes >> ${P('team.txt')}`, [TEAM])).code, 0, 'a member may write');
      t.equal(fs.readFileSync(S('team.txt'), 'utf8'), 'g\nyes\n');
      fs.mkdirSync(P('sg'));
      fs.chownSync(P('sg'), 0, TEAM);
      fs.chmodSync(P('sg'), 0o2777);
      t.equal((await as(ALICE, `echo s > ${P('sg/f')}`)).code, 0);
      t.equal(fs.statSync(S('sg/f')).gid, TEAM, 'a setgid directory gives new files its group');
    });

    t.test('execute permission is per user', async (t) => {
      t.equal((await as(ALICE, `printf '#!/bin/sh\\necho ran\\n' > ${P('run.sh')} && chmod 744 ${P('run.sh')} && ${P('run.sh')}`)).stdout, 'ran\n', 'its owner runs it');
      t.match((await as(BOB, P('run.sh'))).stderr, /Permission denied/, 'the others may not');
      t.equal((await as(ALICE, `chmod 755 ${P('run.sh')}`)).code, 0);
      t.equal((await as(BOB, P('run.sh'))).stdout, 'ran\n', 'until it is 755');
    });
  });
}
