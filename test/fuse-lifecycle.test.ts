/**
 * Mount lifecycle through the CLI: the default storage is the mountpoint's
 * own directory, files survive unmount and remount, a daemon killed with -9
 * leaves a dead mount that the next start clears, node's own options given
 * to a --background launcher reach the daemon, and bad arguments give one
 * clear line and a non-zero exit.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { alive, dyadBin, dyadMountBin, exec, isMountedAt, mountCli, sh, tmpdir, waitExit } from './helpers/mount.js';

t.test('unmount and remount over the same directory', async (t) => {
  const mnt = path.join(tmpdir(t), 'dmd');
  fs.mkdirSync(mnt);
  fs.writeFileSync(path.join(mnt, 'before.txt'), 'was here');
  const m = await mountCli(t, mnt);
  t.ok(isMountedAt(mnt), 'mounted');
  t.equal(fs.readFileSync(path.join(mnt, 'before.txt'), 'utf8'), 'was here', 'serves the directory it covers');
  fs.writeFileSync(path.join(mnt, 'during.txt'), 'written through the mount');
  await exec(process.execPath, [dyadBin, 'umount', mnt]);
  await waitExit(m.pid);
  t.notOk(isMountedAt(mnt), 'unmounted');
  t.notOk(alive(m.pid), 'daemon exited after umount');
  t.equal(fs.readFileSync(path.join(mnt, 'during.txt'), 'utf8'), 'written through the mount', 'file is in the directory after unmount');
  const m2 = await mountCli(t, mnt);
  t.equal(fs.readFileSync(path.join(mnt, 'during.txt'), 'utf8'), 'written through the mount', 'and through the remount');
  await m2.umount();
});

t.test('SIGTERM unmounts cleanly', async (t) => {
  const mnt = path.join(tmpdir(t), 'dmd');
  fs.mkdirSync(mnt);
  const m = await mountCli(t, mnt);
  process.kill(m.pid, 'SIGTERM');
  await waitExit(m.pid);
  t.notOk(isMountedAt(mnt));
  t.match(fs.readFileSync(m.log, 'utf8'), /SIGTERM: unmounting/);
});

t.test('--background: node options given to the launcher hold for the daemon', async (t) => {
  const mnt = path.join(tmpdir(t), 'dmd');
  fs.mkdirSync(mnt);
  const log = `${mnt}.log`;
  const { stdout } = await exec(process.execPath, ['--max-old-space-size=321', dyadMountBin, '--background', '--log', log, '--kvs-data', `${mnt}.kvs`, mnt]);
  const pid = Number(/pid (\d+)/.exec(stdout)?.[1]);
  t.teardown(async () => {
    if (isMountedAt(mnt)) await exec(process.execPath, [dyadBin, 'umount', mnt]).catch(() => exec('umount', ['-l', mnt]));
    await waitExit(pid);
  });
  t.ok(isMountedAt(mnt), 'mounted');
  const argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
  t.ok(argv.includes('--max-old-space-size=321'), `daemon runs with the launcher's node options: ${argv.join(' ')}`);
  t.notOk(argv.includes('--background'), 'and in the foreground itself');
});

t.test('stale mount after kill -9 is cleared at the next start', async (t) => {
  const mnt = path.join(tmpdir(t), 'dmd');
  fs.mkdirSync(mnt);
  fs.writeFileSync(path.join(mnt, 'keep.txt'), 'kept');
  const m = await mountCli(t, mnt);
  process.kill(m.pid, 'SIGKILL');
  await waitExit(m.pid);
  t.throws(() => fs.statSync(mnt), { code: 'ENOTCONN' }, 'a dead mount is left behind');
  const m2 = await mountCli(t, mnt);
  t.match(fs.readFileSync(m2.log, 'utf8'), /cleared a stale mount/);
  t.equal(fs.readFileSync(path.join(mnt, 'keep.txt'), 'utf8'), 'kept', 'the new daemon serves the storage');
  await m2.umount();
  t.doesNotThrow(() => fs.statSync(mnt));
});

t.test('bad arguments: one line, non-zero exit', async (t) => {
  const dir = tmpdir(t);
  const file = path.join(dir, 'f');
  fs.writeFileSync(file, '');
  const cases: Array<[string[], RegExp]> = [
    [[], /no mountpoint: give MOUNTPOINT or set DYAD_PATH_CONSUMER/],
    [[path.join(dir, 'nope')], /no such directory/],
    [[file], /not a directory/],
    [['--passthrough', 'maybe', dir], /argument 'maybe' is invalid/],
    [['--attr-timeout', '-3', dir], /--attr-timeout must be a number/],
    [['--kvs-event-hold', 'soon', dir], /--kvs-event-hold must be a number/],
    [['--storage', file, dir], /--storage .*: not a directory/],
  ];
  for (const [args, re] of cases) {
    const r = await sh(`${process.execPath} ${dyadMountBin} ${args.join(' ')}`);
    t.not(r.code, 0, `exit code for ${args.join(' ') || '(no args)'}`);
    t.match(r.stderr, re);
    t.notOk(isMountedAt(dir));
  }
  const help = await sh(`${process.execPath} ${dyadMountBin} --help`);
  for (const opt of ['--storage', '--passthrough', '--attr-timeout', '--spin', '--background', '--log', '--log-level']) {
    t.match(help.stdout, opt, `--help explains ${opt}`);
  }
  const um = await sh(`${process.execPath} ${dyadBin} umount ${dir}`);
  t.not(um.code, 0, 'umount of something not mounted fails');
  t.match(um.stderr, /umount/);
});
