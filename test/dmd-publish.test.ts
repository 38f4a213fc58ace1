/**
 * Publication on a mount, whatever the transport: what close(), a killed
 * writer, a rewrite, DYAD_ASYNC_PUBLISH and DYAD_FSYNC_WRITE do, locks, and
 * what a restart cleans up. Nodes as in dmd-flow: a dyad-mount daemon each,
 * node 0 serving the embedded KVS; the programs are plain tools.
 */
import t, { type Test } from 'tap';
import fs from 'node:fs';
import { createHash } from 'node:crypto';
import path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { cFixture, cluster, exited, mountCli, sh, sleep, waitExit, type Cluster } from './helpers/mount.js';
import { ucxAvailable } from '../src/dtl/index.js';

t.test('locks stay on their node', async (t) => {
  const c = await cluster(t, 2);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  fs.writeFileSync(path.join(p.mnt, 'lk'), 'l');
  await sleep(300);
  // Node 0 holds an exclusive lock for a while: a second taker on node 0 is refused, one on node 1 is not.
  const holder = sh(`flock -x ${path.join(p.mnt, 'lk')} -c 'sleep 3'`, { timeoutMs: 20_000 });
  await sleep(500);
  const here = await sh(`flock -n -x ${path.join(p.mnt, 'lk')} -c true`);
  t.not(here.code, 0, 'the same node: refused while held');
  const there = await sh(`timeout 10 flock -n -x ${path.join(q.mnt, 'lk')} -c true`);
  t.equal(there.code, 0, `another node: its own lock (${there.stderr})`);
  await holder;
});


t.test('nodes on different transports: the reader fails at once, and its log names the mismatch', { skip: !ucxAvailable() && 'UCX transport not built here' }, async (t) => {
  // --push-max 0: bytes pushed with the publication would need no transfer at all.
  const c = await cluster(t, 2, ['--push-max', '0'], (rank) => ['--dtl', rank === 0 ? 'ucx' : 'tcp']);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  fs.writeFileSync(path.join(p.mnt, 'x.txt'), 'over UCX');
  const r = await sh(`timeout 20 cat ${path.join(q.mnt, 'x.txt')}`, { timeoutMs: 30_000 });
  t.match(r.stderr, /Input\/output error/, 'EIO');
  t.match(fs.readFileSync(q.log, 'utf8'), /rank 0 transfers over UCX and this node over TCP: every node needs the same DYAD_DTL_MODE/, 'the log says why');
});


/**
 * A reader on node `q` of a file that node `p`'s program is rewriting: it
 * must wait for the rewrite's close, and then get the new bytes whole.
 */
async function readDuringRewrite(t: Test, pFile: string, qFile: string): Promise<void> {
  // Rewrites in place, in two halves, and holds the file open between them until told to go on.
  const prog = `import sys\nf = open(sys.argv[1], "r+b")\nf.truncate(0)\nf.write(b"version 2, first half; ")\nf.flush()\nprint("writing", flush=True)\nsys.stdin.readline()\nf.write(b"second half")\nf.close()\nprint("closed", flush=True)`;
  const w = spawn('python3', ['-c', prog, pFile], { stdio: ['pipe', 'pipe', 'pipe'] });
  t.teardown(() => w.kill('SIGKILL'));
  const wDone = exited(w);
  let wOut = '';
  w.stdout!.on('data', (d: Buffer) => (wOut += d));
  // Whole lines only: with PYTHONUNBUFFERED set, print() writes the word and its newline apart.
  for (let i = 0; i < 400 && !wOut.includes('writing\n'); i++) await sleep(50);
  t.equal(wOut, 'writing\n', 'the producer is half way through its rewrite');
  const r = spawn('python3', ['-c', 'import sys\nsys.stdout.write(open(sys.argv[1]).read())', qFile], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => r.kill('SIGKILL'));
  let rExited = false;
  const rDone = exited(r).then((x) => ((rExited = true), x));
  // Either the reader is done (it read the file mid-rewrite: wrong), or it
  // waits in open() for the publication.
  const waiting = () => {
    try {
      return fs.readFileSync(`/proc/${r.pid}/wchan`, 'utf8') !== '0' && fs.readFileSync(`/proc/${r.pid}/syscall`, 'utf8').split(' ')[0] === String(openatNr[process.arch]);
    } catch {
      return false;
    }
  };
  for (let i = 0; i < 400 && !rExited && !waiting(); i++) await sleep(50);
  w.stdin!.end('go on\n');
  t.equal((await wDone).out, 'writing\nclosed\n', 'the producer closed its rewrite');
  const got = await rDone;
  t.equal(got.out, 'version 2, first half; second half', `the reader waited, then read the rewrite whole (${got.err})`);
}

/** openat(2)'s number: a program waiting in it for a publication. */
const openatNr: Record<string, number> = { x64: 257, arm64: 56 };

t.test('a file rewritten after its publication is withdrawn until closed: readers elsewhere wait for it', { skip: openatNr[process.arch] === undefined && `no openat(2) number for ${process.arch}` }, async (t) => {
  t.test('shared storage: the reader does not see the file half rewritten', async (t) => {
    const c = await cluster(t, 1, ['--shared-storage']);
    const shared = c.nodes[0]!.storage;
    const q = await joinNode(t, c, 1, [], ['--shared-storage', '--storage', shared]);
    const p = c.nodes[0]!;
    fs.writeFileSync(path.join(p.mnt, 'v.txt'), 'version 1');
    const r1 = await sh(`timeout 20 cat ${path.join(q.mnt, 'v.txt')}`, { timeoutMs: 30_000 });
    t.equal(r1.stdout, 'version 1', r1.stderr);
    await readDuringRewrite(t, path.join(p.mnt, 'v.txt'), path.join(q.mnt, 'v.txt'));
  });
  t.test('storage per node: a first reader elsewhere does not pull the file half rewritten', async (t) => {
    const c = await cluster(t, 2, ['--push-max', '0']);
    const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
    fs.writeFileSync(path.join(p.mnt, 'v.txt'), 'version 1');
    // Known on the other node (listed), not yet pulled.
    t.ok(fs.readdirSync(q.mnt).includes('v.txt'), 'published');
    await readDuringRewrite(t, path.join(p.mnt, 'v.txt'), path.join(q.mnt, 'v.txt'));
    // Opened for writing and closed unchanged: published again, the same file.
    const same = await sh(`python3 -c 'open("${path.join(p.mnt, 'v.txt')}", "r+b").close()' && timeout 20 cat ${path.join(c.nodes[1]!.mnt, 'v.txt')}`, { timeoutMs: 30_000 });
    t.equal(same.stdout, 'version 2, first half; second half', same.stderr);
  });
});


t.test('close() of one of several descriptors does not publish a file still being written', async (t) => {
  const c = await cluster(t, 2);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  // Readers wait on node 1 before anything exists.
  const redirected = exited(spawn('cat', [path.join(q.mnt, 'redirected.txt')]));
  const duped = exited(spawn('cat', [path.join(q.mnt, 'duped.txt')]));
  await sleep(500);
  // A shell's `>` opens the file, dup2s it onto stdout and closes the first descriptor before echo writes.
  const a = await sh(`echo hello > ${path.join(p.mnt, 'redirected.txt')}`);
  t.equal(a.code, 0, a.stderr);
  // Written through fd 3, which is then closed while its duplicate fd 4 stays open and writes more.
  const b = await sh(`exec 3> ${path.join(p.mnt, 'duped.txt')}; echo first >&3; exec 4>&3; exec 3>&-; sleep 0.5; echo second >&4; exec 4>&-`);
  t.equal(b.code, 0, b.stderr);
  const r1 = await redirected;
  t.equal(r1.out, 'hello\n', 'the redirect target was published with its content, not empty');
  const r2 = await duped;
  t.equal(r2.out, 'first\nsecond\n', 'the duplicated descriptor\'s writes are part of what was published');
  // A parent hands the file to a child and closes its own copy before the child writes.
  const handed = exited(spawn('cat', [path.join(q.mnt, 'handed.txt')]));
  await sleep(300);
  const h = await sh(`exec 3> ${path.join(p.mnt, 'handed.txt')}; (sleep 0.5; echo late >&3) & exec 3>&-; wait`);
  t.equal(h.code, 0, h.stderr);
  t.equal((await handed).out, 'late\n', 'what the child wrote after the parent closed is what was published');
});

/**
 * Runs python3 with `prog`; if it is not done in 20 s, kills the daemon
 * `pid`, the only way to free a program stuck in a close() the daemon never
 * answers. Resolves with its exit code, or 'stuck'.
 */
function runUnlessStuck(prog: string, args: string[], pid: number): Promise<number | 'stuck'> {
  return new Promise((resolve) => {
    const child = spawn('python3', ['-c', prog, ...args], { stdio: 'ignore' });
    const timer = setTimeout(() => {
      process.kill(pid, 'SIGKILL');
      resolve('stuck');
    }, 20_000);
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve(code ?? -1);
    });
  });
}

t.test('an execve that closes a file open for writing neither waits nor keeps it from being published', async (t) => {
  const c = await cluster(t, 2);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  // Python opens files close-on-exec: the execve closes the file, and its
  // FLUSH reaches the daemon in the middle of the execve.
  const execs = `import os, sys\nf = open(sys.argv[1], "w")\nf.write("before exec\\n")\nf.flush()\nos.execv("/bin/true", ["true"])`;
  t.equal(await runUnlessStuck(execs, [path.join(p.mnt, 'exec.txt')], p.pid), 0, 'the program ran on into the new one');
  const r1 = await sh(`timeout 20 cat ${path.join(q.mnt, 'exec.txt')}`, { timeoutMs: 30_000 });
  t.equal(r1.stdout, 'before exec\n', `published with what was written (${r1.stderr})`);
  // A parent starts a child while it has a file open for writing: the
  // child's execve closes the child's copy; the parent writes on.
  const spawns = `import subprocess, sys\nf = open(sys.argv[1], "w")\nf.write("a\\n")\nf.flush()\nsubprocess.run(["true"], check=True)\nf.write("b\\n")\nf.close()`;
  t.equal(await runUnlessStuck(spawns, [path.join(p.mnt, 'spawn.txt')], p.pid), 0, 'the parent started its child and finished');
  const r2 = await sh(`timeout 20 cat ${path.join(q.mnt, 'spawn.txt')}`, { timeoutMs: 30_000 });
  t.equal(r2.stdout, 'a\nb\n', `published once the parent closed it, with all it wrote (${r2.stderr})`);
});

t.test('publishing reads the file without touching its atime; a reader\'s read does touch it', async (t) => {
  const c = await cluster(t, 1);
  const [p] = c.nodes as [(typeof c.nodes)[0]];
  const file = path.join(p.mnt, 'atime.txt');
  const stored = path.join(p.storage, 'atime.txt');
  fs.writeFileSync(file, 'some bytes\n');
  // close() returned after the publication, which read the file for its digest.
  const after = fs.statSync(stored, { bigint: true });
  t.ok(after.atimeNs < after.mtimeNs, `the atime is still the creation's, before the writes (${after.atimeNs} < ${after.mtimeNs})`);
  // relatime: the first read after a write updates the atime.
  t.equal((await sh(`cat ${file}`)).stdout, 'some bytes\n');
  const read = fs.statSync(stored, { bigint: true });
  t.ok(read.atimeNs >= read.mtimeNs, 'a reader through the mount updates it');
});

t.test('an open for writing that another user may not make leaves the file published', async (t) => {
  const c = await cluster(t, 2);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  fs.chmodSync(c.base, 0o755); // the test user must reach the mounts
  fs.writeFileSync(path.join(p.mnt, 'mine.txt'), 'root wrote this\n', { mode: 0o644 });
  const w = await sh(`setpriv --reuid=1002 --regid=1002 --clear-groups -- bash -c 'echo more >> ${path.join(p.mnt, 'mine.txt')}'`);
  t.match(w.stderr, /Permission denied/, 'the write is refused');
  // A rewrite withdraws the publication until the writer closes: a refused one must not.
  const r = await sh(`timeout 10 cat ${path.join(q.mnt, 'mine.txt')}`, { timeoutMs: 20_000 });
  t.equal(r.stdout, 'root wrote this\n', `still published: another node reads it (${r.stderr})`);
});

t.test('bytes written through a mapping after close() are published again when the mapping goes (no passthrough)', async (t) => {
  // With passthrough the mapping holds the storage file itself, and the
  // kernel sends no RELEASE at munmap (docs/SEMANTICS.md, Publishing).
  const c = await cluster(t, 2, ['--passthrough', 'off']);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  const r = await sh(`${cFixture('mmap_after_close')} ${path.join(p.mnt, 'mapped.txt')} mapped-bytes`);
  t.equal(r.code, 0, r.stderr);
  // close() published the file before the mapping was written; the kernel's
  // RELEASE, at munmap, publishes it again. That comes after the program has
  // moved on, so wait (boundedly) until node 1 shows the later mtime.
  const mtime = Math.floor(fs.statSync(path.join(p.storage, 'mapped.txt')).mtimeMs);
  let seen = 0;
  for (let i = 0; i < 200 && seen !== mtime; i++) {
    if (i > 0) await sleep(50);
    seen = Math.floor(fs.statSync(path.join(q.mnt, 'mapped.txt')).mtimeMs);
  }
  t.equal(seen, mtime, 'node 1 sees the version written through the mapping');
  t.equal(fs.readFileSync(path.join(q.mnt, 'mapped.txt'), 'utf8'), 'mapped-bytes');
});


/** Starts another node of cluster c; `env` (NAME=value) goes to its daemon, as a job script would set DYAD_* variables. */
async function joinNode(t: Parameters<typeof mountCli>[0], c: Cluster, rank: number, env: string[] = [], args: string[] = []) {
  const mnt = path.join(c.base, `j${rank}`);
  const storage = path.join(c.base, `js${rank}`);
  fs.mkdirSync(mnt);
  fs.mkdirSync(storage);
  const m = await mountCli(t, mnt, ['--kvs', c.kvsUrl, '--secret-file', c.secretFile, '--rank', String(rank), '--storage', storage, ...args], env.length ? ['env', ...env] : []);
  return { ...m, storage, rank };
}

/** A Python program writing `bytes` to a file and closing it; prints "closed" once close() has returned without error. */
const writeAndClose = (file: string, bytes: number) =>
  `python3 -c 'import sys\nwith open(sys.argv[1], "wb") as f: f.write(bytes(i % 251 for i in range(${bytes})))\nprint("closed")' ${file}`;
const md5Of = (bytes: number) => createHash('md5').update(Buffer.from(Array.from({ length: bytes }, (_, i) => i % 251))).digest('hex');


t.test('DYAD_ASYNC_PUBLISH: close() does not wait for the publication, which still happens', async (t) => {
  const c = await cluster(t, 1);
  const kvs = c.nodes[0]!;
  const p = await joinNode(t, c, 1, ['DYAD_ASYNC_PUBLISH=1']);
  const q = await joinNode(t, c, 2);
  // With the daemon serving the KVS stopped, a publication cannot complete:
  // a close() that waited for it would not return.
  process.kill(kvs.pid, 'SIGSTOP');
  t.teardown(() => process.kill(kvs.pid, 'SIGCONT'));
  const w = await sh(`timeout 10 ${writeAndClose(path.join(p.mnt, 'async.bin'), 100_000)}`, { timeoutMs: 20_000 });
  process.kill(kvs.pid, 'SIGCONT');
  t.equal(w.code, 0, w.stderr);
  t.equal(w.stdout, 'closed\n', 'close() returned while the KVS could not be reached');
  // The publication went ahead in the background once the KVS answered.
  const r = await sh(`timeout 20 md5sum < ${path.join(q.mnt, 'async.bin')}`, { timeoutMs: 30_000 });
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stdout.split(' ')[0], md5Of(100_000), 'a reader on another node got the bytes');
});

t.test('a file whose writer is killed while it is open is not published; one left open at a plain exit is', async (t) => {
  const c = await cluster(t, 2);
  const [p, q] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  // Killed with the file open (as by the OOM killer, or a job's time limit):
  // the kernel closes it, and the bytes so far are all there is.
  const killed = `import os, signal, sys\nf = open(sys.argv[1], "wb")\nf.write(b"x" * 100000)\nf.flush()\nos.kill(os.getpid(), signal.SIGKILL)`;
  const k = await sh(`python3 -c '${killed}' ${path.join(p.mnt, 'torn.bin')}; echo $?`, { timeoutMs: 30_000 });
  t.equal(k.stdout, '137\n', 'the writer was killed');
  // Exiting with the file still open, and with another thread alive (the
  // thread that closes the files is then not always the one calling exit).
  const exits = `import os, sys, threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\nfd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\nos.write(fd, b"y" * 100000)\nos._exit(3)`;
  const e = await sh(`python3 -c '${exits}' ${path.join(p.mnt, 'exited.bin')}`, { timeoutMs: 30_000 });
  t.equal(e.code, 3, 'the other writer exited without closing');
  // Published after both: once the other node has it, whatever the producer
  // published before is in the KVS too.
  fs.writeFileSync(path.join(p.mnt, 'after.txt'), 'after');
  const r = await sh(`timeout 20 cat ${path.join(q.mnt, 'after.txt')}`, { timeoutMs: 30_000 });
  t.equal(r.stdout, 'after', r.stderr);
  t.equal(fs.statSync(path.join(p.storage, 'torn.bin')).size, 100000, 'the torn file stays in its node\'s storage');
  t.notOk(fs.existsSync(path.join(q.mnt, 'torn.bin')), 'but no other node sees it');
  t.match(fs.readFileSync(p.log, 'utf8'), /torn\.bin not published: its writer \(pid \d+\) was killed by a signal/, 'the log says why');
  const x = await sh(`timeout 20 md5sum < ${path.join(q.mnt, 'exited.bin')}`, { timeoutMs: 30_000 });
  t.equal(x.stdout.split(' ')[0], createHash('md5').update(Buffer.alloc(100000, 'y')).digest('hex'), `the file left open at exit was published (${x.stderr})`);
});

t.test('a restarted daemon does not publish the files whose writers never finished them', async (t) => {
  const c = await cluster(t, 2);
  const [o, p] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  fs.writeFileSync(path.join(p.mnt, 'complete.txt'), 'complete');
  // A writer killed with its file open.
  const killed = `import os, signal, sys\nf = open(sys.argv[1], "wb")\nf.write(b"x" * 100000)\nf.flush()\nos.kill(os.getpid(), signal.SIGKILL)`;
  const k = await sh(`python3 -c '${killed}' ${path.join(p.mnt, 'torn.bin')}; echo $?`, { timeoutMs: 30_000 });
  t.equal(k.stdout, '137\n', 'the writer was killed');
  // A writer still writing when its node's daemon dies.
  const holds = `import sys, time\nf = open(sys.argv[1], "wb")\nf.write(b"h" * 100000)\nf.flush()\nprint("written", flush=True)\ntime.sleep(600)`;
  fs.mkdirSync(path.join(p.mnt, 'sub'));
  const writer = spawn('python3', ['-c', holds, path.join(p.mnt, 'sub', 'held.bin')], { stdio: ['ignore', 'pipe', 'inherit'] });
  t.teardown(() => writer.kill('SIGKILL'));
  const written = await new Promise<boolean>((resolve) => {
    writer.stdout!.once('data', () => resolve(true));
    writer.once('exit', () => resolve(false));
  });
  if (!written) {
    t.fail('the writer could not open its file');
    return;
  }
  // The one published before the restart, for the barrier below.
  const r0 = await sh(`timeout 20 cat ${path.join(o.mnt, 'complete.txt')}`, { timeoutMs: 30_000 });
  t.equal(r0.stdout, 'complete', r0.stderr);
  process.kill(p.pid, 'SIGKILL');
  await waitExit(p.pid);
  writer.kill('SIGKILL');
  await exited(writer);
  t.equal(fs.statSync(path.join(p.storage, 'sub', 'held.bin')).size, 100000, 'what the cut-off writer wrote is in storage');
  const scans = () => fs.readFileSync(p.log, 'utf8').split('\n').filter((l) => l.includes('storage scan:'));
  const scansBefore = scans().length;
  const again = await mountCli(t, p.mnt, ['--kvs', c.kvsUrl, '--secret-file', c.secretFile, '--rank', '1', '--storage', p.storage]);
  for (let i = 0; i < 200 && scans().length === scansBefore; i++) await sleep(50);
  t.match(scans().at(-1) ?? '', /2 left unpublished as unfinished/, 'the next daemon scanned its storage, and left two files unpublished');
  const log = fs.readFileSync(p.log, 'utf8');
  t.match(log, /torn\.bin not published: its writer never closed it/, 'the log names the killed writer\'s file');
  t.match(log, /sub\/held\.bin not published: its writer never closed it/, 'and the cut-off writer\'s');
  // The scan publishes before it logs: what it left out is not in the KVS.
  t.notOk(fs.existsSync(path.join(o.mnt, 'torn.bin')), 'no other node sees the killed writer\'s file');
  t.notOk(fs.existsSync(path.join(o.mnt, 'sub', 'held.bin')), 'nor the cut-off writer\'s');
  t.equal(fs.statSync(path.join(again.mnt, 'torn.bin')).size, 100000, 'both stay on their node');
  const r1 = await sh(`timeout 20 cat ${path.join(o.mnt, 'complete.txt')}`, { timeoutMs: 30_000 });
  t.equal(r1.stdout, 'complete', `the complete file is served again (${r1.stderr})`);
  // Written again, and closed: complete, and published.
  fs.writeFileSync(path.join(again.mnt, 'torn.bin'), 'whole now');
  const r2 = await sh(`timeout 20 cat ${path.join(o.mnt, 'torn.bin')}`, { timeoutMs: 30_000 });
  t.equal(r2.stdout, 'whole now', `a file written again to the end is published (${r2.stderr})`);
  // Or taken as it is: opened for writing and closed, nothing written.
  await sh(`: >> ${path.join(again.mnt, 'sub', 'held.bin')}`);
  const r3 = await sh(`timeout 20 md5sum < ${path.join(o.mnt, 'sub', 'held.bin')}`, { timeoutMs: 30_000 });
  t.equal(r3.stdout.split(' ')[0], createHash('md5').update(Buffer.alloc(100000, 'h')).digest('hex'), `one opened for writing and closed unchanged is published as it is (${r3.stderr})`);
});

/** close(2)'s number, to see a program blocked in it through /proc/PID/syscall. */
const closeNr: Record<string, number> = { x64: 3, arm64: 57 };

t.test('a close() waiting for its publication lets a signalled program go, and the publication still happens', { skip: closeNr[process.arch] === undefined && `no close(2) number for ${process.arch}` }, async (t) => {
  const c = await cluster(t, 1);
  const kvs = c.nodes[0]!;
  const p = await joinNode(t, c, 1);
  const q = await joinNode(t, c, 2);
  const file = path.join(p.mnt, 'interrupted.bin');
  // The daemon serving the KVS stopped: the publication inside close() cannot complete.
  process.kill(kvs.pid, 'SIGSTOP');
  t.teardown(() => process.kill(kvs.pid, 'SIGCONT'));
  const prog = `import sys\nf = open(sys.argv[1], "wb")\nf.write(bytes(i % 251 for i in range(100000)))\nprint("closing", flush=True)\nf.close()\nprint("closed", flush=True)`;
  const w = spawn('python3', ['-c', prog, file], { stdio: ['ignore', 'pipe', 'pipe'] });
  const done = exited(w);
  t.teardown(() => w.kill('SIGKILL'));
  const inClose = () => {
    try {
      return Number(fs.readFileSync(`/proc/${w.pid}/syscall`, 'utf8').split(' ')[0]) === closeNr[process.arch];
    } catch {
      return false;
    }
  };
  for (let i = 0; i < 400 && !inClose(); i++) await sleep(50);
  t.ok(inClose(), 'the writer is blocked in close()');
  w.kill('SIGTERM');
  const gone = await Promise.race([done.then((r) => r), sleep(10_000).then(() => undefined)]);
  t.ok(gone, 'SIGTERM ended the writer while the KVS was still stopped');
  t.equal(gone?.out, 'closing\n', 'its close() did not return as if the file were published');
  process.kill(kvs.pid, 'SIGCONT');
  // The publication carried on once the KVS answered.
  const r = await sh(`timeout 20 md5sum < ${path.join(q.mnt, 'interrupted.bin')}`, { timeoutMs: 30_000 });
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stdout.split(' ')[0], md5Of(100_000), 'a reader on another node got the bytes');
});

const noStrace = spawnSync('strace', ['-V']).error ? 'strace is not installed' : false;

t.test('DYAD_FSYNC_WRITE: the file is fsynced before its record goes to the KVS', { skip: noStrace }, async (t) => {
  const c = await cluster(t, 1);
  const p = await joinNode(t, c, 1, ['DYAD_FSYNC_WRITE=1']);
  const kvsPort = new URL(c.kvsUrl).port;
  // -yy names each descriptor: the file's storage path, or the TCP endpoints of the KVS connection.
  const out = path.join(c.base, 'strace.out');
  const tracer = spawn('strace', ['-f', '-yy', '-s', '4096', '-e', 'trace=fsync,fdatasync,write,writev,sendto,sendmsg', '-o', out, '-p', String(p.pid)], { stdio: ['ignore', 'ignore', 'pipe'] });
  const traced = exited(tracer);
  t.teardown(() => tracer.kill('SIGKILL'));
  let err = '';
  tracer.stderr?.on('data', (d: Buffer) => (err += d));
  for (let i = 0; i < 200 && !err.includes(`Process ${p.pid} attached`); i++) await sleep(50);
  t.match(err, `Process ${p.pid} attached`, 'strace is attached to the daemon');
  const w = await sh(`timeout 20 ${writeAndClose(path.join(p.mnt, 'fsynced.bin'), 100_000)}`, { timeoutMs: 30_000 });
  t.equal(w.stdout, 'closed\n', w.stderr);
  tracer.kill('SIGINT');
  await traced;
  const lines = fs.readFileSync(out, 'utf8').split('\n');
  const file = path.join(p.storage, 'fsynced.bin');
  const synced = lines.findIndex((l) => l.includes(`fsync(`) && l.includes(`<${file}>`));
  const sent = lines.findIndex((l) => /(write|writev|sendto|sendmsg)\(\d+<TCP:\[/.test(l) && l.includes(`:${kvsPort}]>`) && l.includes('fsynced.bin'));
  t.ok(synced >= 0, `the daemon fsynced ${file}`);
  t.ok(sent >= 0, 'the daemon sent its record to the KVS');
  t.ok(synced >= 0 && synced < sent, 'the fsync came first');
  const r = await sh(`timeout 20 md5sum < ${path.join(c.nodes[0]!.mnt, 'fsynced.bin')}`, { timeoutMs: 30_000 });
  t.equal(r.stdout.split(' ')[0], md5Of(100_000), `a reader on another node got the bytes (${r.stderr})`);
});


t.test('a restarted daemon removes the temporary files of pulls that died with the last one, and never shows them', async (t) => {
  const c = await cluster(t, 2);
  const [o, p] = c.nodes as [(typeof c.nodes)[0], (typeof c.nodes)[0]];
  fs.mkdirSync(path.join(p.mnt, 'sub'));
  fs.writeFileSync(path.join(p.mnt, 'sub', 'kept.txt'), 'kept');
  // What a pull leaves when its daemon is killed mid-transfer: a file named
  // as partPathFor names it (the daemon's pid first), beside its destination.
  // Made by hand: killing a daemon while a pull is under way is a race.
  const parts = [`.dyad-part-${p.pid}-0123abcd-1`, `sub/.dyad-part-${p.pid}-0123abcd-2`];
  for (const n of parts) fs.writeFileSync(path.join(p.storage, n), 'half a file');
  // And one of a pull under way by another daemon sharing this storage
  // (DYAD_SERVICE_MUX): a live process's pid.
  const sibling = spawn('sleep', ['600'], { stdio: 'ignore' });
  t.teardown(() => sibling.kill('SIGKILL'));
  const siblings = `sub/.dyad-part-${sibling.pid}-89abcdef-3`;
  fs.writeFileSync(path.join(p.storage, siblings), 'a pull under way');
  const shown = async (mnt: string) => {
    const r = await sh(`timeout 10 ls -aR ${mnt}; for f in ${parts.map((n) => path.join(mnt, n)).join(' ')}; do timeout 10 stat $f > /dev/null 2>&1 && echo "stat $f"; done`, { timeoutMs: 30_000 });
    return r.stdout.split('\n').filter((l) => l.includes('.dyad-part'));
  };
  t.same(await shown(p.mnt), [], 'not shown by the daemon that made them');
  process.kill(p.pid, 'SIGKILL');
  await waitExit(p.pid);
  const scans = () => fs.readFileSync(p.log, 'utf8').split('\n').filter((l) => l.includes('storage scan:')).length;
  const scansBefore = scans();
  const again = await mountCli(t, p.mnt, ['--kvs', c.kvsUrl, '--secret-file', c.secretFile, '--rank', '1', '--storage', p.storage]);
  t.same(await shown(again.mnt), [], 'nor by the next one, while it scans its storage');
  // The scan runs in the background once the mount answers, and logs when done.
  for (let i = 0; i < 200 && scans() === scansBefore; i++) await sleep(50);
  t.ok(scans() > scansBefore, 'the next daemon scanned its storage');
  const left = () => parts.filter((n) => fs.existsSync(path.join(p.storage, n)));
  t.same(left(), [], 'the next daemon removed them from storage, in subdirectories too');
  t.ok(fs.existsSync(path.join(p.storage, siblings)), "but not a live daemon's pull under way");
  t.same(await shown(o.mnt), [], 'and no other node shows them');
  t.equal(fs.readFileSync(path.join(p.storage, 'sub', 'kept.txt'), 'utf8'), 'kept', 'the files beside them stay');
  const r = await sh(`timeout 20 cat ${path.join(o.mnt, 'sub', 'kept.txt')}`, { timeoutMs: 30_000 });
  t.equal(r.stdout, 'kept', `and are served again (${r.stderr})`);
});
