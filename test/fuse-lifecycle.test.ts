/**
 * Mount lifecycle through the CLI: the default storage is the mountpoint's
 * own directory, files survive unmount and remount, a daemon killed with -9
 * leaves a dead mount that the next start clears, node's own options given
 * to a --background launcher reach the daemon, and bad arguments give one
 * clear line and a non-zero exit. `dyad umount` leaves alone what is not a
 * dyad-fs mount, and a busy one unless told -l.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
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
    // The errno's name is in the line: the exit code is 1 whatever the cause.
    [[path.join(dir, 'nope')], /no such directory \(ENOENT\)$/],
    [[file], /not a directory \(ENOTDIR\)$/],
    [['--passthrough', 'maybe', dir], /^dyad-mount: option '--passthrough <mode>' argument 'maybe' is invalid.*\(see --help\)$/],
    [['--attr-timeout', '-3', dir], /--attr-timeout must be a number/],
    [['--kvs-event-hold', 'soon', dir], /--kvs-event-hold must be a number/],
    [['--spin', '5000000000', dir], /--spin must be at most 4294967295/],
    // 0 would renew the lease every millisecond.
    [['--rank-lease', '0', dir], /--rank-lease must be a number > 0/],
    // Past Node's timer limit a timeout fires at once.
    [['--rank-lease', '3000000', dir], /--rank-lease must be at most 2147483 seconds/],
    [['--kvs-event-hold', '3000000000', dir], /--kvs-event-hold must be at most 2147483647 milliseconds/],
    [['--wait-timeout', '3000000', dir], /--wait-timeout=3000000: expected at most 2147483 seconds/],
    [['--peer-timeout', '3000000', dir], /--peer-timeout=3000000: expected at most 2147483 seconds/],
    [['--storage', file, dir], /--storage .*: not a directory \(ENOTDIR\)$/],
    [['--storage', path.join(dir, 'nope'), dir], /--storage .*nope: does not exist \(ENOENT\)$/],
    [['--kvs-data', file, dir], /--kvs-data .*f: not a directory \(ENOTDIR\)$/],
    [['--log', path.join(dir, 'nope', 'log'), dir], /--log .*nope\/log: cannot open: no such file or directory \(ENOENT\)$/],
  ];
  for (const [args, re] of cases) {
    // Bounded: a bad value taken for a good one would mount and serve in the foreground.
    const r = await sh(`${process.execPath} ${dyadMountBin} ${args.join(' ')}`, { timeoutMs: 20_000 });
    const what = args.join(' ') || '(no args)';
    t.not(r.code, 0, `exit code for ${what}`);
    t.match(r.stderr.trim(), re, what);
    t.equal(r.stderr.trim().split('\n').length, 1, `one line for ${what}`);
    t.notOk(isMountedAt(dir));
  }
  const help = await sh(`${process.execPath} ${dyadMountBin} --help`);
  for (const opt of ['--storage', '--passthrough', '--attr-timeout', '--spin', '--background', '--log', '--log-level']) {
    t.match(help.stdout, opt, `--help explains ${opt}`);
  }
  const um = await sh(`${process.execPath} ${dyadBin} umount ${dir}`);
  t.not(um.code, 0, 'umount of something not mounted fails');
  t.match(um.stderr, /umount .*: not mounted \(EINVAL\)/);
  t.equal(um.stderr.trim().split('\n').length, 1, 'in one line');
});

t.test('dyad umount only unmounts dyad-fs, and not a busy one unless lazily; no second daemon on a mount', async (t) => {
  const dir = tmpdir(t);
  const oneLine = (r: { code: number; stderr: string }, re: RegExp, what: string) => {
    t.not(r.code, 0, `${what}: exit code`);
    t.match(r.stderr.trim(), re, what);
    t.equal(r.stderr.trim().split('\n').length, 1, `${what}: one line`);
  };
  if (process.getuid?.() === 0) {
    const other = path.join(dir, 'tmpfs');
    fs.mkdirSync(other);
    await exec('mount', ['-t', 'tmpfs', 'tmpfs', other]);
    t.teardown(() => exec('umount', [other]).catch(() => undefined));
    oneLine(await sh(`${process.execPath} ${dyadBin} umount ${other}`), /umount .*tmpfs: not a dyad-fs mount \(tmpfs from tmpfs\).*\(EINVAL\)$/, 'a tmpfs');
    t.ok(isMountedAt(other), 'the tmpfs stays mounted');
  }
  const mnt = path.join(dir, 'dmd');
  fs.mkdirSync(mnt);
  const m = await mountCli(t, mnt);
  const mountsAt = () => fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n').filter((l) => l.split(' ')[4] === mnt).length;
  // In the background, so that a second daemon that did start cannot hang the test.
  const second = await sh(`${process.execPath} ${dyadMountBin} --background --log ${mnt}.log2 --kvs-data ${mnt}.kvs2 ${mnt}`);
  const pid2 = Number(/pid (\d+)/.exec(second.stdout)?.[1]);
  if (pid2) {
    t.teardown(async () => {
      while (isMountedAt(mnt)) await exec('umount', ['-l', mnt]);
      await waitExit(pid2);
    });
  }
  oneLine(second, /^dyad-mount: .*dmd: already mounted .*\(EBUSY\)$/, 'a second dyad-mount');
  t.equal(mountsAt(), 1, 'nothing stacked on the mount');
  // A process whose working directory is in the mount keeps it busy.
  const holder = spawn('sleep', ['30'], { cwd: mnt, stdio: 'ignore' });
  t.teardown(() => holder.kill('SIGKILL'));
  oneLine(await sh(`${process.execPath} ${dyadBin} umount ${mnt}`), /umount .*: busy .*\(EBUSY\)$/, 'a busy mount without -l');
  t.ok(isMountedAt(mnt), 'stays mounted');
  const lazy = await sh(`${process.execPath} ${dyadBin} umount -l ${mnt}`);
  t.equal(lazy.code, 0, `-l detaches a busy mount (${lazy.stderr})`);
  t.notOk(isMountedAt(mnt), 'at once');
  holder.kill('SIGKILL');
  await waitExit(m.pid);
  t.notOk(alive(m.pid), 'the daemon exits once the last user lets go');
});
