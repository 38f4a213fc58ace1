/**
 * Producer → consumer across nodes on one machine: each node a dyad-mount
 * daemon over its own storage, node 0 serving the embedded KVS. Programs are
 * plain shell tools: nothing is preloaded. dmd-flow-ucx runs this suite
 * again over UCX; what publication does whatever the transport is in
 * dmd-publish, run once.
 */
import t from 'tap';
import fs from 'node:fs';
import { createHash } from 'node:crypto';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { cFixture, cluster, exited, mountCli, pulls, sh, sleep, smallTmpfs, tmpdir } from './helpers/mount.js';


t.test('consumer first, producer first, listings, empty files', async (t) => {
  const c = await cluster(t, 2, ['--log-level', 'debug']);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];

  // Consumer first: the open blocks until the producer's file is published.
  const cons = spawn('cat', [path.join(q.mnt, 'first.txt')]);
  const done = exited(cons);
  await sleep(500);
  t.equal(cons.exitCode, null, 'consumer is still waiting');
  fs.writeFileSync(path.join(p.mnt, 'first.txt'), 'made on node 0\n');
  const r = await done;
  t.equal(r.code, 0, r.err);
  t.equal(r.out, 'made on node 0\n', 'consumer read the producer\'s bytes');
  t.equal(fs.readFileSync(path.join(q.storage, 'first.txt'), 'utf8'), 'made on node 0\n', 'pulled into node 1 storage');

  // Producer first; stat and readdir show the file before any byte moves.
  fs.writeFileSync(path.join(p.mnt, 'second.bin'), Buffer.alloc(100_000, 3));
  fs.mkdirSync(path.join(p.mnt, 'sub'));
  fs.writeFileSync(path.join(p.mnt, 'sub', 'empty'), '');
  const st = fs.statSync(path.join(q.mnt, 'second.bin'));
  t.equal(st.size, 100_000, 'stat shows the published size');
  t.ok(st.isFile());
  t.notOk(fs.existsSync(path.join(q.storage, 'second.bin')), 'stat moved no bytes');
  t.ok(fs.readdirSync(q.mnt).includes('second.bin'), 'readdir lists remote files');
  t.ok(fs.readdirSync(q.mnt).includes('sub'), 'and directories holding them');
  const ls = await sh(`ls -l ${q.mnt}`);
  t.match(ls.stdout, /100000 .* second\.bin/);
  t.notOk(fs.existsSync(path.join(q.storage, 'second.bin')), 'ls -l moved no bytes');
  t.same(fs.readFileSync(path.join(q.mnt, 'second.bin')), Buffer.alloc(100_000, 3));
  t.equal(fs.readFileSync(path.join(q.mnt, 'sub', 'empty'), 'utf8'), '', 'empty files are published and pulled');
  t.ok(fs.existsSync(path.join(q.storage, 'sub', 'empty')));

  // Reading it again costs nothing: it is local now.
  const before = pulls(q.log);
  t.equal(fs.readFileSync(path.join(q.mnt, 'first.txt'), 'utf8'), 'made on node 0\n');
  t.equal(pulls(q.log), before, 'no second pull');
  t.equal(fs.readdirSync(q.storage).filter((n) => n.startsWith('.dyad-part')).length, 0, 'no temp files left');
});

t.test('creating never blocks, probes never block', async (t) => {
  const c = await cluster(t, 2);
  const q = c.nodes[1]!;
  const r = await sh(`touch ${path.join(q.mnt, 'new')} && stat ${path.join(q.mnt, 'missing')}; echo rc=$?; ls ${q.mnt}; test -e ${path.join(q.mnt, 'missing')}; echo e=$?`, { timeoutMs: 20_000 });
  t.match(r.stdout, /rc=1/, 'stat of an unpublished name: ENOENT at once');
  t.match(r.stdout, /\bnew\b/);
  t.match(r.stdout, /e=1/);
  fs.writeFileSync(path.join(c.nodes[0]!.mnt, 'both'), 'remote');
  fs.writeFileSync(path.join(q.mnt, 'both'), 'local');
  t.equal(fs.readFileSync(path.join(q.mnt, 'both'), 'utf8'), 'local', 'a create over a published name makes a local file');
});

t.test('a producer writes into a directory that only another node has made', async (t) => {
  const c = await cluster(t, 2);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  fs.mkdirSync(path.join(p.mnt, 'shared', 'deep'), { recursive: true });
  fs.writeFileSync(path.join(p.mnt, 'shared', 'deep', 'from0'), 'zero');
  // Node 1 has never looked at shared/: the shell's redirect creates straight
  // into it. The same thread then becomes a reader (exec) waiting for a file
  // in a directory nobody has made yet.
  const cons = sh(`echo one > ${path.join(q.mnt, 'shared', 'deep', 'from1')} && exec cat ${path.join(q.mnt, 'later', 'x')}`, { timeoutMs: 30_000 });
  await sleep(500);
  fs.mkdirSync(path.join(p.mnt, 'later'));
  fs.writeFileSync(path.join(p.mnt, 'later', 'x'), 'late');
  const r = await cons;
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stdout, 'late', 'the exec\'d reader waited and read');
  t.equal(fs.readFileSync(path.join(q.storage, 'shared', 'deep', 'from1'), 'utf8'), 'one\n', 'created in node 1 storage');
  t.equal(fs.readFileSync(path.join(p.mnt, 'shared', 'deep', 'from1'), 'utf8'), 'one\n', 'and published for node 0');
  const miss = await sh(`echo x > ${path.join(q.mnt, 'nowhere', 'f')}`);
  t.match(miss.stderr, /No such file or directory/, 'a directory no node has: ENOENT, at once');
});

t.test('mkdir, symlink, link, rename and mknod into directories only another node has made', async (t) => {
  const c = await cluster(t, 2);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  // One directory per call, so that each call is the first on node 1 to
  // look its directory up (these calls, unlike open, name their path in
  // arguments the daemon does not read for every system call).
  for (const d of ['mk', 'sym', 'hard', 'mv', 'nod']) {
    fs.mkdirSync(path.join(p.mnt, d));
    fs.writeFileSync(path.join(p.mnt, d, 'seed'), d);
  }
  fs.writeFileSync(path.join(q.mnt, 'local1'), 'l1');
  fs.writeFileSync(path.join(q.mnt, 'local2'), 'l2');
  const calls: [string, string][] = [
    ['mkdir', `mkdir ${path.join(q.mnt, 'mk', 'sub')}`],
    ['symlink', `ln -s seed ${path.join(q.mnt, 'sym', 'link')}`],
    ['link', `ln ${path.join(q.mnt, 'local1')} ${path.join(q.mnt, 'hard', 'again')}`],
    ['rename', `mv ${path.join(q.mnt, 'local2')} ${path.join(q.mnt, 'mv', 'moved')}`],
    ['mknod', `python3 -c 'import os, stat; os.mknod("${path.join(q.mnt, 'nod', 'plain')}", stat.S_IFREG | 0o644)'`],
  ];
  for (const [what, cmd] of calls) {
    const r = await sh(cmd, { timeoutMs: 20_000 });
    t.equal(r.code, 0, `${what}: ${r.stderr}`);
  }
  t.ok(fs.statSync(path.join(q.storage, 'mk', 'sub')).isDirectory(), 'mkdir: made in node 1 storage');
  t.equal(fs.readlinkSync(path.join(q.storage, 'sym', 'link')), 'seed', 'symlink: made in node 1 storage');
  t.equal(fs.readFileSync(path.join(q.storage, 'hard', 'again'), 'utf8'), 'l1', 'link: made in node 1 storage');
  t.equal(fs.readFileSync(path.join(q.storage, 'mv', 'moved'), 'utf8'), 'l2', 'rename: moved in node 1 storage');
  t.ok(fs.statSync(path.join(q.storage, 'nod', 'plain')).isFile(), 'mknod: made in node 1 storage');
  const miss = await sh(`mkdir ${path.join(q.mnt, 'nowhere', 'sub')}`);
  t.match(miss.stderr, /No such file or directory/, 'a directory no node has: ENOENT, at once');
});

t.test('renaming a directory publishes its files under the new name, and withdraws the old', async (t) => {
  const c = await cluster(t, 2);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  fs.mkdirSync(path.join(p.mnt, 'tmp', 'sub'), { recursive: true });
  fs.writeFileSync(path.join(p.mnt, 'tmp', 'a'), 'aaa');
  fs.writeFileSync(path.join(p.mnt, 'tmp', 'sub', 'b'), Buffer.alloc(100_000, 3));
  // A reader on the other node waits for a name that only the rename makes.
  const cons = sh(`timeout 20 cat ${path.join(q.mnt, 'done', 'sub', 'b')} | md5sum; exit \${PIPESTATUS[0]}`, { timeoutMs: 30_000 });
  await sleep(300);
  fs.renameSync(path.join(p.mnt, 'tmp'), path.join(p.mnt, 'done'));
  const r = await cons;
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stdout.split(' ')[0], createHash('md5').update(Buffer.alloc(100_000, 3)).digest('hex'), 'the waiting reader got the file under its new name');
  const a = await sh(`timeout 10 cat ${path.join(q.mnt, 'done', 'a')}`, { timeoutMs: 20_000 });
  t.equal(a.stdout, 'aaa', 'the other file too');
  const old = await sh(`stat ${path.join(q.mnt, 'tmp', 'a')}`);
  t.match(old.stderr, /No such file or directory/, 'the old name is gone on the other node');
});

t.test('a node keeps the copy it pulled (write-once); removing a file withdraws it from the other nodes', async (t) => {
  const c = await cluster(t, 2);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  fs.writeFileSync(path.join(p.mnt, 'x'), 'v1');
  const first = await sh(`timeout 10 cat ${path.join(q.mnt, 'x')}`, { timeoutMs: 20_000 });
  t.equal(first.stdout, 'v1');
  fs.writeFileSync(path.join(p.mnt, 'x'), 'version two');
  await sleep(300);
  const again = await sh(`timeout 10 cat ${path.join(q.mnt, 'x')}`, { timeoutMs: 20_000 });
  t.equal(again.stdout, 'v1', 'the copy already held is kept');
  fs.writeFileSync(path.join(p.mnt, 'y'), 'y');
  await sleep(300);
  const seen = await sh(`stat -c %s ${path.join(q.mnt, 'y')}`);
  t.equal(seen.stdout.trim(), '1', 'published: the other node shows it');
  fs.unlinkSync(path.join(p.mnt, 'y'));
  await sleep(300);
  const gone = await sh(`stat -c %s ${path.join(q.mnt, 'y')}`);
  t.match(gone.stderr, /No such file or directory/, 'removed: the other node no longer shows it');
});

t.test('ranks that share a node (DYAD_SERVICE_MUX) and its storage never transfer between them', async (t) => {
  const shared = tmpdir(t, 'dyadfs-mux-');
  // Ranks 0 and 1 are one node with mux 2, and so are ranks 2 and 3: only
  // the second pair shares a storage here. --push-max 0: bytes pushed with
  // the publication would also spare the transfer, whatever the mux.
  const c = await cluster(t, 4, ['--service-mux', '2', '--log-level', 'debug', '--push-max', '0'], (rank) => (rank >= 2 ? ['--storage', shared] : []));
  const [r0, r1, r2, r3] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0], (typeof c.nodes)[0], (typeof c.nodes)[0]];
  const cons = sh(`timeout 20 cat ${path.join(r3.mnt, 'm.txt')}`, { timeoutMs: 30_000 });
  await sleep(500);
  fs.writeFileSync(path.join(r2.mnt, 'm.txt'), 'same node');
  const r = await cons;
  t.equal(r.stdout, 'same node', `the waiting reader on the other rank of the node read it (${r.stderr})`);
  t.equal(pulls(r3.log), 0, 'without a transfer');
  t.same(fs.readdirSync(shared).filter((n) => n.startsWith('.dyad-part')), [], 'and no temp file');
  // Ranks 0 and 1 are one node by the mux but each has a storage of its
  // own: the reader fails, and its log says what is wrong.
  fs.writeFileSync(path.join(r0.mnt, 'split.txt'), 'elsewhere');
  const split = await sh(`timeout 20 cat ${path.join(r1.mnt, 'split.txt')}`, { timeoutMs: 30_000 });
  t.match(split.stderr, /Input\/output error/, 'a mux over storages that are not shared: EIO');
  t.match(fs.readFileSync(r1.log, 'utf8'), /split\.txt: published by rank 0, which DYAD_SERVICE_MUX=2 puts on this node, but missing from this node's storage: do its ranks share one storage\?/, 'the log names the misconfiguration');
});

t.test('creates by relative path, through directories only another node has, one name repeated', async (t) => {
  const c = await cluster(t, 2);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  fs.mkdirSync(path.join(p.mnt, 'rep', 'rep'), { recursive: true });
  fs.writeFileSync(path.join(p.mnt, 'rep', 'rep', 'seed'), 's');
  // Each 'rep' on the way is a directory node 1 has never seen: the path
  // names it more than once, so only the caller's cwd tells which one a
  // LOOKUP is about. './top' is a plain create through '.'.
  const r = await sh(`cd ${q.mnt} && echo one > rep/rep/rep && echo two > ./top && cat rep/rep/rep top rep/rep/seed`, { timeoutMs: 20_000 });
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stdout, 'one\ntwo\ns', 'created inside the published directories and read back');
  t.equal(fs.readFileSync(path.join(q.storage, 'rep', 'rep', 'rep'), 'utf8'), 'one\n', 'in node 1 storage');
  t.equal(fs.readFileSync(path.join(p.mnt, 'rep', 'rep', 'rep'), 'utf8'), 'one\n', 'and published for node 0');
  const miss = await sh(`cd ${q.mnt} && echo x > nowhere/nowhere`);
  t.match(miss.stderr, /No such file or directory/, 'a directory no node has: ENOENT, at once');
});

t.test('many concurrent consumers of one file cause one pull', async (t) => {
  const c = await cluster(t, 2, ['--log-level', 'debug']);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  const readers = Array.from({ length: 12 }, () => exited(spawn('md5sum', [path.join(q.mnt, 'shared.bin')])));
  await sleep(500);
  const data = Buffer.alloc(3 << 20);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 255;
  fs.writeFileSync(path.join(p.mnt, 'shared.bin'), data);
  const results = await Promise.all(readers);
  const sums = new Set(results.map((r) => r.out.split(' ')[0]));
  t.ok(results.every((r) => r.code === 0), 'all readers succeeded');
  t.equal(sums.size, 1, 'all read the same bytes');
  const local = await sh(`md5sum ${path.join(p.storage, 'shared.bin')}`);
  t.equal([...sums][0], local.stdout.split(' ')[0], 'and they are the producer\'s');
  t.equal(pulls(q.log), 1, 'exactly one pull');
});

t.test('readers racing for files already published cause one pull each', async (t) => {
  // Unlike the test above, the name is published before the readers come:
  // their LOOKUPs, not cached by the kernel, give each its own placeholder,
  // and a late one may open after the first pull is done.
  const c = await cluster(t, 2, ['--log-level', 'debug']);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  const names = Array.from({ length: 8 }, (_, i) => `racy${i}.bin`);
  for (const [i, n] of names.entries()) fs.writeFileSync(path.join(p.mnt, n), Buffer.alloc(1 << 20, i + 1));
  for (const [i, n] of names.entries()) {
    const results = await Promise.all(Array.from({ length: 8 }, () => exited(spawn('md5sum', [path.join(q.mnt, n)]))));
    const want = createHash('md5').update(Buffer.alloc(1 << 20, i + 1)).digest('hex');
    t.ok(results.every((r) => r.code === 0 && r.out.split(' ')[0] === want), `${n}: every reader read the producer's bytes`);
  }
  const perName = names.map((n) => fs.readFileSync(q.log, 'utf8').split('\n').filter((l) => l.includes(` pulled ${n} `)).length);
  t.same(perName, names.map(() => 1), 'one pull per file');
});

t.test('nested directories that do not exist yet anywhere', async (t) => {
  const c = await cluster(t, 2);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  const cons = exited(spawn('cat', [path.join(q.mnt, 'a/b/c/deep.txt')]));
  await sleep(300);
  fs.mkdirSync(path.join(p.mnt, 'a/b/c'), { recursive: true });
  fs.writeFileSync(path.join(p.mnt, 'a/b/c/deep.txt'), 'deep');
  const r = await cons;
  t.equal(r.code, 0, r.err);
  t.equal(r.out, 'deep');
  t.ok(fs.statSync(path.join(q.storage, 'a/b/c')).isDirectory(), 'directories exist on the consumer');
});

t.test('a timeout, and an interrupted wait', async (t) => {
  const c = await cluster(t, 2, [], (rank) => (rank === 1 ? ['--wait-timeout', '1'] : []));
  const q = c.nodes[1]!;
  const r = await sh(`cat ${path.join(q.mnt, 'never.txt')}`, { timeoutMs: 30_000 });
  t.not(r.code, 0);
  t.match(r.stderr, /timed out/i, 'ETIMEDOUT after --wait-timeout');
  const i = await sh(`${cFixture('open_intr')} ${path.join(c.nodes[0]!.mnt, 'never2.txt')} 1`, { timeoutMs: 30_000 });
  t.equal(i.stdout.trim(), 'EINTR', 'a signal ends the wait with EINTR');
  // The daemon keeps serving after both.
  fs.writeFileSync(path.join(c.nodes[0]!.mnt, 'later.txt'), 'ok');
  t.equal(fs.readFileSync(path.join(q.mnt, 'later.txt'), 'utf8'), 'ok');
});

t.test('a failed owner: EIO within the peer timeout, no partial file', async (t) => {
  const c = await cluster(t, 3, ['--peer-timeout', '2']);
  const [, p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0], (typeof c.nodes)[0]];
  fs.writeFileSync(path.join(p.mnt, 'orphan.bin'), Buffer.alloc(1 << 20, 1));
  process.kill(p.pid, 'SIGKILL');
  await sleep(200);
  const r = await sh(`cat ${path.join(q.mnt, 'orphan.bin')} > /dev/null`, { timeoutMs: 60_000 });
  t.not(r.code, 0);
  t.match(r.stderr, /Input\/output error/, 'EIO');
  t.notOk(fs.existsSync(path.join(q.storage, 'orphan.bin')), 'no file');
  t.equal(fs.readdirSync(q.storage).filter((n) => n.startsWith('.dyad-part')).length, 0, 'no temp file');
  t.match(fs.readFileSync(q.log, 'utf8'), /pull of orphan\.bin from rank 1 .*failed/, 'log names the file and the owner');
});

t.test('shared storage: synchronise only, never transfer', async (t) => {
  const c0 = await cluster(t, 1, ['--shared-storage', '--log-level', 'debug']);
  const shared = c0.nodes[0]!.storage;
  const mntB = path.join(c0.base, 'b');
  fs.mkdirSync(mntB);
  const b = await mountCli(t, mntB, ['--kvs', c0.kvsUrl, '--secret-file', c0.secretFile, '--rank', '1', '--shared-storage', '--storage', shared, '--log-level', 'debug']);
  const cons = exited(spawn('cat', [path.join(mntB, 'sync.txt')]));
  await sleep(500);
  fs.writeFileSync(path.join(c0.nodes[0]!.mnt, 'sync.txt'), 'shared bytes');
  const r = await cons;
  t.equal(r.code, 0, r.err);
  t.equal(r.out, 'shared bytes');
  t.equal(pulls(b.log), 0, 'nothing was transferred');
  t.notMatch(fs.readFileSync(b.log, 'utf8'), /transfer service/, 'no transfer service in shared mode');
});

t.test('a dead node\'s rank lease expires: readers fail at once, also those that pulled from it before', async (t) => {
  // --push-max 0: the file's bytes must not travel with its publication, or the reader would not need the owner.
  // Every daemon gets the short lease, so the live ones renew often enough (a third of it) not to expire.
  const c = await cluster(t, 3, ['--peer-timeout', '30', '--push-max', '0', '--rank-lease', '1']);
  const [, p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0], (typeof c.nodes)[0]];
  fs.writeFileSync(path.join(p.mnt, 'gone.txt'), 'x');
  fs.writeFileSync(path.join(p.mnt, 'before.txt'), 'b');
  // The reader has pulled from the owner before, so it knows its address.
  t.equal(fs.readFileSync(path.join(q.mnt, 'before.txt'), 'utf8'), 'b');
  process.kill(p.pid, 'SIGKILL');
  // Only an expiry logged after the kill counts.
  const from = fs.readFileSync(c.nodes[0]!.log, 'utf8').length;
  const since = () => fs.readFileSync(c.nodes[0]!.log, 'utf8').slice(from);
  for (let i = 0; i < 100 && !/rank 1 of namespace dyad expired/.test(since()); i++) await sleep(100);
  t.match(since(), /rank 1 of namespace dyad expired/, 'the KVS dropped the dead rank');
  const r = await sh(`cat ${path.join(q.mnt, 'gone.txt')}`, { timeoutMs: 60_000 });
  t.not(r.code, 0);
  t.match(r.stderr, /Input\/output error/);
  t.match(fs.readFileSync(q.log, 'utf8'), /rank 1 has no transfer address registered/, 'no connection attempt to a dead node');
});

t.test('a program published on one node runs on another, waiting for it first', async (t) => {
  const c = await cluster(t, 2);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  // exec checks the execute bit before it opens: the mode must come from
  // the record, and a program not yet published is waited for.
  const run = sh(`${path.join(q.mnt, 'bin', 'hello')} world`, { timeoutMs: 30_000 });
  await sleep(300);
  fs.mkdirSync(path.join(p.mnt, 'bin'));
  fs.writeFileSync(path.join(p.mnt, 'bin', 'tmp'), '#!/bin/sh\necho "hello $1"\n', { mode: 0o755 });
  fs.renameSync(path.join(p.mnt, 'bin', 'tmp'), path.join(p.mnt, 'bin', 'hello'));
  const r = await run;
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stdout, 'hello world\n');
  const again = await sh(`${path.join(q.mnt, 'bin', 'hello')} again`);
  t.equal(again.stdout, 'hello again\n', 'and runs again from the local copy');
});

t.test('a name this node has heard nothing of, read as a file, that is a directory: EISDIR, then it lists', async (t) => {
  const c = await cluster(t, 1);
  const p = c.nodes[0]!;
  fs.mkdirSync(path.join(p.mnt, 'early', 'sub'), { recursive: true });
  fs.writeFileSync(path.join(p.mnt, 'early', 'sub', 'f'), 'x');
  // Node 1 starts afterwards: no change event told it of 'early'.
  const mnt = path.join(c.base, 'late-n1');
  const storage = path.join(c.base, 'late-s1');
  fs.mkdirSync(mnt);
  fs.mkdirSync(storage);
  await mountCli(t, mnt, ['--kvs', c.kvsUrl, '--secret-file', c.secretFile, '--rank', '1', '--storage', storage]);
  const r = await sh(`cat ${path.join(mnt, 'early')}`, { timeoutMs: 20_000 });
  t.not(r.code, 0);
  t.match(r.stderr, /Is a directory/);
  t.same(fs.readdirSync(path.join(mnt, 'early')), ['sub'], 'the next lookup sees the directory');
  t.equal(fs.readFileSync(path.join(mnt, 'early', 'sub', 'f'), 'utf8'), 'x');
  t.ok(fs.statSync(path.join(mnt, 'early')).isDirectory());
});

t.test('a daemon spinning for requests still serves its sockets and timers', async (t) => {
  // --spin keeps a daemon polling /dev/fuse after each request. Here the
  // window is ten minutes: the flow below finishes only if, while spinning,
  // node 0 still answers node 1's KVS requests and pulls and runs its timers.
  const c = await cluster(t, 2, ['--spin', '600000000', '--push-max', '0']);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  const data = Buffer.alloc(3 << 20, 7);
  const cons = sh(`cat ${path.join(q.mnt, 'spun', 'big')} | md5sum`, { timeoutMs: 60_000 });
  await sleep(300);
  fs.mkdirSync(path.join(p.mnt, 'spun'));
  fs.writeFileSync(path.join(p.mnt, 'spun', 'big'), data);
  fs.writeFileSync(path.join(p.mnt, 'spun', 'small'), 'small');
  const r = await cons;
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stdout.split(' ')[0], createHash('md5').update(data).digest('hex'), 'the waiting reader got the file from the spinning node');
  t.equal(fs.readFileSync(path.join(q.mnt, 'spun', 'small'), 'utf8'), 'small', 'and a small one after it');
});

t.test('small files travel with their publication: readers need no transfer', async (t) => {
  const c = await cluster(t, 3, ['--log-level', 'debug', '--peer-timeout', '2']);
  const [, p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0], (typeof c.nodes)[0]];
  const small = Buffer.alloc(10 << 10, 7);
  fs.writeFileSync(path.join(p.mnt, 'small.bin'), small);
  fs.writeFileSync(path.join(p.mnt, 'bigger.bin'), Buffer.alloc((16 << 10) + 1, 8));
  fs.chmodSync(path.join(p.mnt, 'small.bin'), 0o640);
  fs.appendFileSync(path.join(p.mnt, 'small.bin'), 'and more');
  await sleep(300); // the change events reach node 2
  // With the owner gone, only bytes that came with the publication can be read.
  process.kill(p.pid, 'SIGKILL');
  const r = await sh(`md5sum < ${path.join(q.mnt, 'small.bin')}; stat -c %a ${path.join(q.mnt, 'small.bin')}`, { timeoutMs: 30_000 });
  const want = createHash('md5').update(Buffer.concat([small, Buffer.from('and more')])).digest('hex');
  t.equal(r.stdout.split(' ')[0], want, 'the reader got the latest version of the small file');
  t.equal(r.stdout.split('\n')[1], '640', 'with its mode');
  t.match(fs.readFileSync(q.log, 'utf8'), /small\.bin \(10248 B\) came with rank 1's publication/);
  t.equal(pulls(q.log), 0, 'nothing was pulled');
  // Node 0 serves the KVS in-process: the bytes reach it too.
  const k = c.nodes[0]!;
  const rk = await sh(`md5sum < ${path.join(k.mnt, 'small.bin')}`, { timeoutMs: 30_000 });
  t.equal(rk.stdout.split(' ')[0], want, 'the node serving the KVS got it too');
  t.match(fs.readFileSync(k.log, 'utf8'), /small\.bin \(10248 B\) came with rank 1's publication/);
  const b = await sh(`cat ${path.join(q.mnt, 'bigger.bin')} > /dev/null`, { timeoutMs: 60_000 });
  t.match(b.stderr, /Input\/output error/, 'a file over --push-max still needs its owner');
  t.equal(fs.readdirSync(q.storage).filter((n) => n.startsWith('.dyad-part')).length, 0, 'no temp file');
});

t.test('a pull into a full storage: ENOSPC for the opener, nothing left behind', async (t) => {
  const small = path.join(tmpdir(t, 'dyadfs-full-'), 'storage');
  if (!smallTmpfs(t, small)) return;
  const c = await cluster(t, 2, [], (rank) => (rank === 1 ? ['--storage', small] : []));
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  fs.writeFileSync(path.join(p.mnt, 'big.bin'), Buffer.alloc(2 << 20, 5));
  // open() is where the pull happens: Python names the errno it failed with.
  const open = `import errno, sys\ntry:\n    open(sys.argv[1], "rb")\n    print("opened")\nexcept OSError as e:\n    print(errno.errorcode[e.errno])`;
  const r = await sh(`timeout 20 python3 -c '${open}' ${path.join(q.mnt, 'big.bin')}`, { timeoutMs: 30_000 });
  t.equal(r.stdout.trim(), 'ENOSPC', `open() failed with ENOSPC (${r.stderr})`);
  const c2 = await sh(`timeout 20 cat ${path.join(q.mnt, 'big.bin')} > /dev/null`, { timeoutMs: 30_000 });
  t.match(c2.stderr, /No space left on device/, 'and so does cat');
  const leftovers = (dir: string) => fs.readdirSync(dir).filter((n) => n.startsWith('.dyad-part') || n === 'big.bin');
  t.same(leftovers(small), [], 'neither a temporary file nor the file in storage');
  t.same(fs.readdirSync(q.mnt).filter((n) => n.startsWith('.dyad-part')), [], 'no temporary file through the mount');
  t.match(fs.readFileSync(q.log, 'utf8'), /pull of big\.bin from rank 0 .*failed: .*no space left/i, 'the log names the file and the owner');
  // The failed pull holds no space: a file that fits still comes through.
  fs.writeFileSync(path.join(p.mnt, 'fits.bin'), Buffer.alloc(100_000, 6));
  t.same(fs.readFileSync(path.join(q.mnt, 'fits.bin')), Buffer.alloc(100_000, 6), 'a file that fits is pulled');
});

