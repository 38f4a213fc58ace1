/**
 * The KVS as a separate service: `dyad kvs serve`, namespaces, a restart
 * that loses no publication and lets waiting readers finish, and the start
 * errors a user gets for a bad configuration.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { dyadBin, dyadMountBin, exec, mountCli, sh, tmpdir } from './helpers/mount.js';
import { freePort } from './helpers/ports.js';
import { etcdUnavailable, startEtcd } from './helpers/etcd.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** `dyad kvs serve`, once it says it is serving; `said` is what it printed until then. */
async function startKvs(t: { teardown(fn: () => unknown): void }, port: number, data: string, extra: string[] = []): Promise<ChildProcess & { said: string }> {
  const child = spawn(process.execPath, [dyadBin, 'kvs', 'serve', '--listen', `127.0.0.1:${port}`, '--data', data, ...extra], { stdio: ['ignore', 'ignore', 'pipe'] });
  t.teardown(() => child.kill('SIGKILL'));
  const said = await new Promise<string>((resolve, reject) => {
    let err = '';
    child.stderr!.on('data', (d: Buffer) => {
      err += d;
      if (err.includes('serving the embedded KVS')) resolve(err);
    });
    child.on('exit', (code) => reject(new Error(`kvs serve exited ${code}: ${err}`)));
  });
  return Object.assign(child, { said });
}

/** Two nodes (ranks 0 and 1, `args(rank)` added) of namespace wf, in a `dyad kvs serve` of their own. */
async function kvsAndTwoNodes(t: Parameters<typeof startKvs>[0], args: (rank: number) => string[] = () => []) {
  const base = tmpdir(t);
  const data = path.join(base, 'kvs');
  const port = await freePort();
  const url = `dyad://127.0.0.1:${port}`;
  const kvs = await startKvs(t, port, data);
  const created = await exec(process.execPath, [dyadBin, 'namespace', 'create', 'wf', '--kvs', url, '--data', data]);
  const secret = path.join(data, 'secrets', 'wf.secret');
  const nodes = [];
  for (const rank of [0, 1]) {
    const mnt = path.join(base, `n${rank}`);
    const storage = path.join(base, `s${rank}`);
    fs.mkdirSync(mnt);
    fs.mkdirSync(storage);
    nodes.push({ ...(await mountCli(t, mnt, ['--kvs', url, '--secret-file', secret, '--namespace', 'wf', '--rank', String(rank), '--storage', storage, ...args(rank)])), storage });
  }
  const [p, q] = nodes as [(typeof nodes)[0], (typeof nodes)[0]];
  return { kvs, port, url, data, secret, created, p, q };
}

t.test('KVS restart: no publication lost, waits resume', async (t) => {
  const c = await kvsAndTwoNodes(t);
  const { port, url, data, secret, p, q } = c;
  let kvs = c.kvs;
  t.match(c.created.stdout, /created namespace wf/);
  const list = await exec(process.execPath, [dyadBin, 'namespace', 'list', '--kvs', url, '--data', data]);
  t.match(list.stdout, /^wf$/m);
  t.equal(fs.statSync(secret).mode & 0o777, 0o600, 'the namespace secret file is private');
  fs.writeFileSync(path.join(p.mnt, 'before.txt'), 'published before the restart');
  const waiting = sh(`cat ${path.join(q.mnt, 'after.txt')}`, { timeoutMs: 60_000 });
  await sleep(300);
  kvs.kill('SIGTERM');
  await new Promise((r) => kvs.on('exit', r));
  kvs = await startKvs(t, port, data);
  fs.writeFileSync(path.join(p.mnt, 'after.txt'), 'published after the restart');
  const r = await waiting;
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stdout, 'published after the restart', 'the waiting reader finished');
  t.equal(fs.readFileSync(path.join(q.mnt, 'before.txt'), 'utf8'), 'published before the restart', 'the earlier publication survived');
  kvs.kill('SIGTERM');
});

t.test('a publication the KVS failed is tried again until it lands', async (t) => {
  // The writer's node publishes in the background (--async-publish): one
  // attempt, at the last release, that nobody waits for; only trying again
  // can publish the file. (A close() that waits tries at FLUSH and again at
  // RELEASE, 30 s each.)
  const c = await kvsAndTwoNodes(t, (rank) => (rank === 0 ? ['--async-publish'] : []));
  const { port, data, p, q } = c;
  let kvs = c.kvs;
  kvs.kill('SIGKILL');
  await new Promise((r) => kvs.on('exit', r));
  const w = await sh(`echo during the outage > ${path.join(p.mnt, 'during.txt')}`, { timeoutMs: 30_000 });
  t.equal(w.code, 0, 'the writer finished');
  // The KVS client gives up after its request timeout (30 s).
  const failed = () => /publish of during\.txt failed: .*; trying again in/.test(fs.readFileSync(p.log, 'utf8'));
  for (let i = 0; i < 1200 && !failed(); i++) await sleep(100);
  t.ok(failed(), 'the publication failed, and the log says it will be tried again');
  kvs = await startKvs(t, port, data);
  const r = await sh(`timeout 120 cat ${path.join(q.mnt, 'during.txt')}`, { timeoutMs: 150_000 });
  t.equal(r.stdout, 'during the outage\n', `a reader on another node got it once the KVS was back (${r.stderr})`);
  kvs.kill('SIGTERM');
});

t.test('etcd: a secret that is not the namespace\'s stops the start with one line', { skip: etcdUnavailable() ?? false }, async (t) => {
  const etcd = await startEtcd();
  t.teardown(() => etcd.destroy());
  const url = etcd.url();
  await exec(process.execPath, [dyadBin, 'namespace', 'create', 'dyad', '--kvs', url]);
  const base = tmpdir(t);
  const mnt = path.join(base, 'm');
  const storage = path.join(base, 's');
  fs.mkdirSync(mnt);
  fs.mkdirSync(storage);
  // Well formed (64 hex digits), and not the namespace's.
  const r = await sh(`DYAD_SECRET=${'ab'.repeat(32)} ${process.execPath} ${dyadMountBin} --kvs ${url} --storage ${storage} ${mnt}`, { timeoutMs: 30_000 });
  t.not(r.code, 0, 'the start fails');
  t.match(r.stderr, /the secret given \(DYAD_SECRET, DYAD_SECRET_FILE or --secret-file\) is not namespace dyad's in etcd:/);
  t.equal(r.stderr.trim().split('\n').length, 1, 'one line');
  // Without one, the daemon takes the namespace's own from etcd.
  const ok = await mountCli(t, mnt, ['--kvs', url, '--storage', storage]);
  t.ok(ok.pid > 0, 'and starts');
});

t.test('configuration errors stop the start with one line', async (t) => {
  const base = tmpdir(t);
  const mnt = path.join(base, 'm');
  fs.mkdirSync(mnt);
  const run = (env: string, args: string) => sh(`${env} ${process.execPath} ${dyadMountBin} --kvs-data ${path.join(base, 'kvs')} ${args} ${mnt}`, { timeoutMs: 30_000 });
  const cases: Array<[string, string, RegExp]> = [
    ['DYAD_KEY_BINS=0', '', /DYAD_KEY_BINS=0: expected an integer from 1/],
    ['DYAD_DTL_MODE=SPEEDY', '', /DYAD_DTL_MODE=SPEEDY: unknown transfer mode/],
    ['', '--rank -1', /--rank=-1: expected an integer/],
    ['', '--listen nowhere', /--listen=nowhere: expected HOST:PORT/],
    ['', '--kvs http://x:1', /expected dyad:\/\/HOST:PORT/],
    // The URL itself is the problem, not the secret looked up with it.
    ['', '--kvs dyad://host-without-port', /--kvs=dyad:\/\/host-without-port: missing port .*\(EINVAL\)$/],
    ['', '--kvs dyad://h:70000', /--kvs=dyad:\/\/h:70000: port 70000 is out of range/],
    ['', '--kvs mem:', /--kvs=mem:: unsupported scheme mem:/],
    ['DYAD_KVS=etcd://', '', /DYAD_KVS=etcd:\/\/: missing host/],
    ['', '--kvs etcd://h1,h2:0', /--kvs=etcd:\/\/h1,h2:0: port 0 is out of range/],
    ['', '--namespace _x', /--namespace=_x: a namespace is 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit/],
    ['DYAD_WAIT_TIMEOUT=soon', '', /DYAD_WAIT_TIMEOUT=soon: expected a number of seconds/],
    ['DYAD_WAIT_TIMEOUT=3000000', '', /DYAD_WAIT_TIMEOUT=3000000: expected at most 2147483 seconds/],
    ['DYAD_CACHE_POLICY=RANDOM', '', /DYAD_CACHE_POLICY=RANDOM: unknown cache policy \(expected LRU, FIFO or NONE\)/],
    ['DYAD_CACHE_CAPACITY=lots', '', /DYAD_CACHE_CAPACITY=lots: expected a number of bytes/],
    ['', '--cache-low-watermark 0', /--cache-low-watermark=0: expected a fraction above 0 and at most 1/],
    ['DYAD_CACHE_GRACE_PERIOD=-1', '', /DYAD_CACHE_GRACE_PERIOD=-1: expected a number of seconds >= 0/],
  ];
  for (const [env, args, re] of cases) {
    const r = await run(env, args);
    t.not(r.code, 0, `${env}${args} fails`);
    t.match(r.stderr.trim(), re);
    t.equal(r.stderr.trim().split('\n').length, 1, 'one line');
  }
  // A secret file this user cannot read: named with its flag and the errno, not Node's raw error.
  const probe = await sh(`setpriv --reuid=65534 --regid=65534 --clear-groups test -r ${dyadMountBin}`);
  if (process.getuid?.() === 0 && probe.code === 0) {
    fs.chmodSync(base, 0o755);
    const secretFile = path.join(base, 'root-only.secret');
    fs.writeFileSync(secretFile, `${'ab'.repeat(32)}\n`, { mode: 0o600 });
    // Without tap's NODE_OPTIONS: its exit hook would fail to write its own files as that user.
    const r = await sh(`env -u NODE_OPTIONS setpriv --reuid=65534 --regid=65534 --clear-groups ${process.execPath} ${dyadMountBin} --kvs dyad://127.0.0.1:1 --secret-file ${secretFile} ${mnt}`, { timeoutMs: 30_000 });
    t.not(r.code, 0, 'an unreadable --secret-file fails');
    t.match(r.stderr.trim(), /^dyad-mount: --secret-file: cannot read secret file .*root-only\.secret: permission denied \(EACCES\)$/);
    t.equal(r.stderr.trim().split('\n').length, 1, 'one line');
  }
  // With --log the reason goes to the log file, whole, even though the process exits at once.
  const log = path.join(base, 'failed.log');
  const withLog = await run('', `--log ${log} --dtl speedy`);
  t.not(withLog.code, 0);
  t.match(fs.readFileSync(log, 'utf8'), /--dtl=SPEEDY: unknown transfer mode/, 'the log holds the reason');
  // A namespace that does not exist in a KVS served elsewhere.
  const port = await freePort();
  const data = path.join(base, 'kvs2');
  const kvs = await startKvs(t, port, data);
  await exec(process.execPath, [dyadBin, 'namespace', 'create', 'real', '--kvs', `dyad://127.0.0.1:${port}`, '--data', data]);
  const r = await sh(`DYAD_KVS_NAMESPACE=ghost DYAD_SECRET_FILE=${path.join(data, 'secrets', 'real.secret')} ${process.execPath} ${dyadMountBin} --kvs dyad://127.0.0.1:${port} ${mnt}`, { timeoutMs: 30_000 });
  t.not(r.code, 0);
  t.match(r.stderr, /namespace ghost does not exist/);
  t.equal(r.stderr.trim().split('\n').length, 1, 'one line');
  kvs.kill('SIGTERM');
  const hold = await sh(`${process.execPath} ${dyadBin} kvs serve --listen 127.0.0.1:0 --data ${path.join(base, 'kvs3')} --event-hold -1`);
  t.not(hold.code, 0);
  t.match(hold.stderr, /argument '-1' is invalid. --event-hold must be a number >= 0/);
  // A good value reaches the server, standalone or inside a daemon: each says so as it starts.
  const held = await startKvs(t, await freePort(), path.join(base, 'kvs4'), ['--event-hold', '7']);
  t.match(held.said, /change events in a burst held up to 7 ms/);
  held.kill('SIGTERM');
  fs.mkdirSync(path.join(base, 'held'));
  const m = await mountCli(t, path.join(base, 'held'), ['--kvs-event-hold', '0']);
  t.match(fs.readFileSync(m.log, 'utf8'), /change events in a burst held up to 0 ms/);
  await m.umount();
});

t.test('dyad commands: bad input gives one line naming it', async (t) => {
  const base = tmpdir(t);
  const file = path.join(base, 'file');
  fs.writeFileSync(file, '');
  const cases: Array<[string, RegExp]> = [
    ['config --kvs dyad://host-without-port', /^dyad: --kvs=dyad:\/\/host-without-port: missing port/],
    ['config --kvs etcd://', /^dyad: --kvs=etcd:\/\/: missing host/],
    // What dyad-mount would refuse, dyad config refuses too.
    ['config --namespace _x', /^dyad: --namespace=_x: a namespace is 1-128 letters/],
    ['config --wait-timeout 3000000', /^dyad: --wait-timeout=3000000: expected at most 2147483 seconds/],
    // A usage error is one line, not the error and then the whole help.
    ['config --passthrough maybe', /^dyad: option '--passthrough <mode>' argument 'maybe' is invalid.*\(see --help\)$/],
    ['frob', /^dyad: unknown command 'frob'/],
    [`kvs serve --listen localhost --data ${path.join(base, 'kvs')}`, /^dyad: --listen=localhost: expected HOST:PORT/],
    [`kvs serve --listen 127.0.0.1:0 --data ${file}`, /^dyad: --data .*file: not a directory \(ENOTDIR\)$/],
    ['namespace list --kvs dyad://h', /^dyad: --kvs=dyad:\/\/h: missing port/],
  ];
  for (const [args, re] of cases) {
    const r = await sh(`${process.execPath} ${dyadBin} ${args}`, { timeoutMs: 30_000 });
    t.not(r.code, 0, `dyad ${args} fails`);
    t.match(r.stderr.trim(), re, `dyad ${args}`);
    t.equal(r.stderr.trim().split('\n').length, 1, `dyad ${args}: one line`);
  }
});

t.test('dyad config shows values and their sources', async (t) => {
  const r = await sh(`DYAD_KVS_NAMESPACE=envns DYAD_DTL_MODE=FLUX_RPC DYAD_ASYNC_PUBLISH=0 DYAD_SERVICE_MUX=2 DYAD_PATH_ORIGIN=/data/set ${process.execPath} ${dyadBin} config --rank 7 /tmp`);
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /^namespace\s+envns\s+env \(DYAD_KVS_NAMESPACE\)$/m);
  t.match(r.stdout, /^rank\s+7\s+flag \(--rank\)$/m);
  t.match(r.stdout, /^dtl\s+TCP\s+env \(DYAD_DTL_MODE\)$/m);
  t.match(r.stdout, /^asyncPublish\s+true\s+env \(DYAD_ASYNC_PUBLISH\)$/m, 'DYAD booleans: set means true, even 0');
  t.match(r.stdout, /^serviceMux\s+2\s+env/m);
  t.match(r.stdout, /^keyBins\s+1024\s+default$/m);
  t.match(r.stdout, /^origin\s+\/data\/set\s+env \(DYAD_PATH_ORIGIN\)$/m);
  const f = await sh(`DYAD_KVS_NAMESPACE=envns ${process.execPath} ${dyadBin} config --namespace flagns --dtl flux_rpc`);
  t.match(f.stdout, /^namespace\s+flagns\s+flag/m, 'flags win over the environment');
  t.match(f.stdout, /^dtl\s+TCP\s+flag \(--dtl\)$/m, 'the --dtl flag ignores case (DYAD_DTL_MODE does not)');
  const tiny = await sh(`${process.execPath} ${dyadBin} config --wait-timeout 0.0001 --peer-timeout 0.0004`);
  t.equal(tiny.code, 0, tiny.stderr);
  t.match(tiny.stdout, /^waitTimeoutMs\s+1\s+flag/m, 'a tiny timeout is 1 ms, not 0');
  t.match(tiny.stdout, /^peerTimeoutMs\s+1\s+flag/m);
  const cache = await sh(`DYAD_CACHE_CAPACITY=2G DYAD_CACHE_POLICY=F ${process.execPath} ${dyadBin} config --cache-grace-period 0.5`);
  t.equal(cache.code, 0, cache.stderr);
  t.match(cache.stdout, /^cacheCapacityBytes\s+2147483648\s+env \(DYAD_CACHE_CAPACITY\)$/m, 'a capacity takes a binary suffix');
  t.match(cache.stdout, /^cachePolicy\s+FIFO\s+env \(DYAD_CACHE_POLICY\)$/m, 'a policy is matched by prefix, as DYAD does');
  t.match(cache.stdout, /^cacheLowWatermark\s+0\.8\s+default$/m);
  t.match(cache.stdout, /^cacheGraceMs\s+500\s+flag \(--cache-grace-period\)$/m);
});

t.test('dyad config names the UCX transports in use', async (t) => {
  const { ucxAvailable } = await import('../src/dtl/index.js');
  const r = await sh(`UCX_TLS=tcp UCX_NET_DEVICES=lo ${process.execPath} ${dyadBin} config --dtl UCX`);
  t.equal(r.code, 0, r.stderr);
  if (ucxAvailable()) t.match(r.stdout, /^ucx\s+1\.\d+\.\d+: transports .*tcp\/lo/m);
  else t.match(r.stdout, /^ucx\s+not built/m);
});
