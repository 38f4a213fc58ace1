/**
 * A real single-member etcd for tests: Debian's /usr/bin/etcd on 127.0.0.1 with
 * free ports and a throw-away data directory (on /dev/shm when there is one, so
 * that etcd's WAL fsyncs do not dominate the run time). It can be stopped and
 * started again on the same ports and data, which is how the restart tests
 * break every client connection without losing state. A TCP proxy in front of
 * it can cut one client off while the others carry on.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { connect, createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort } from './ports.js';

export const ETCD_BIN = process.env.DYAD_TEST_ETCD ?? '/usr/bin/etcd';

/** Why etcd tests cannot run here, or undefined when they can. */
export function etcdUnavailable(): string | undefined {
  return existsSync(ETCD_BIN) ? undefined : `no etcd binary at ${ETCD_BIN} (set DYAD_TEST_ETCD)`;
}

export interface EtcdServer {
  /** host:port of the client endpoint. */
  readonly endpoint: string;
  /** etcd://host:port, optionally under a key prefix. */
  url(prefix?: string): string;
  readonly dataDir: string;
  readonly running: boolean;
  /** Starts the member again on the same ports and data directory. */
  start(): Promise<void>;
  /** Stops it with `signal` (SIGTERM: clean shutdown; SIGKILL: crash) and waits for the exit. */
  stop(signal?: NodeJS.Signals): Promise<void>;
  /** Stops it and removes the data directory. */
  destroy(): Promise<void>;
  /** The member's recent output, for failure messages. */
  log(): string;
}

async function healthy(endpoint: string): Promise<boolean> {
  try {
    const res = await fetch(`http://${endpoint}/health`, { signal: AbortSignal.timeout(500) });
    const body = (await res.json()) as { health?: unknown };
    return body.health === 'true' || body.health === true;
  } catch {
    return false;
  }
}

/** The health check from inside a network namespace, where our fetch cannot reach. */
function healthyIn(enter: string[], endpoint: string): Promise<boolean> {
  return new Promise((resolve) => {
    const argv = [...enter, 'etcdctl', '--endpoints', endpoint, '--dial-timeout', '500ms', 'endpoint', 'health'];
    const p = spawn(argv[0]!, argv.slice(1), { stdio: 'ignore', env: { ...process.env, ETCDCTL_API: '3' } });
    p.on('exit', (code) => resolve(code === 0));
    p.on('error', () => resolve(false));
  });
}

export interface StartEtcdOptions {
  startTimeoutMs?: number;
  /**
   * Run inside a test host's network namespace: listen on `host` (fixed
   * ports 2379/2380, a fresh namespace has them free) and start it with the
   * `enter` prefix (nsenter --net=...).
   */
  host?: string;
  enter?: string[];
  /** Where the data directory is made; default /dev/shm if present (benchmarks want a real disk). */
  dataParent?: string;
}

export async function startEtcd(opts: StartEtcdOptions = {}): Promise<EtcdServer> {
  const why = etcdUnavailable();
  if (why !== undefined) throw new Error(why);
  const base = opts.dataParent ?? (existsSync('/dev/shm') ? '/dev/shm' : tmpdir());
  const dataDir = await mkdtemp(join(base, 'dyad-etcd-'));
  const inNs = opts.host !== undefined;
  const clientPort = inNs ? 2379 : await freePort();
  let peerPort = inNs ? 2380 : await freePort();
  while (peerPort === clientPort) peerPort = await freePort();
  const host = opts.host ?? '127.0.0.1';
  const endpoint = `${host}:${clientPort}`;
  const peer = `http://${host}:${peerPort}`;
  const args = [
    '--name',
    'test',
    '--data-dir',
    dataDir,
    '--listen-client-urls',
    `http://${endpoint}`,
    '--advertise-client-urls',
    `http://${endpoint}`,
    '--listen-peer-urls',
    peer,
    '--initial-advertise-peer-urls',
    peer,
    '--initial-cluster',
    `test=${peer}`,
    '--initial-cluster-state',
    'new',
    '--logger',
    'zap',
    '--log-level',
    'warn',
  ];
  let child: ChildProcess | undefined;
  let exited: Promise<void> = Promise.resolve();
  let output = '';
  const startTimeoutMs = opts.startTimeoutMs ?? 15_000;

  const start = async (): Promise<void> => {
    if (child !== undefined) throw new Error('etcd is already running');
    const [cmd, ...rest] = [...(opts.enter ?? []), ETCD_BIN, ...args] as [string, ...string[]];
    const proc = spawn(cmd, rest, { stdio: ['ignore', 'pipe', 'pipe'] });
    child = proc;
    const keep = (chunk: Buffer): void => {
      output = (output + chunk.toString('utf8')).slice(-20_000);
    };
    proc.stdout!.on('data', keep);
    proc.stderr!.on('data', keep);
    let died = false;
    exited = new Promise<void>((resolve) =>
      proc.once('exit', () => {
        died = true;
        if (child === proc) child = undefined;
        resolve();
      }),
    );
    const deadline = performance.now() + startTimeoutMs;
    while (!(await (opts.enter ? healthyIn(opts.enter, endpoint) : healthy(endpoint)))) {
      if (died) throw new Error(`etcd exited during start-up:\n${output}`);
      if (performance.now() > deadline) {
        proc.kill('SIGKILL');
        throw new Error(`etcd on ${endpoint} not healthy within ${startTimeoutMs} ms:\n${output}`);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  };

  const stop = async (signal: NodeJS.Signals = 'SIGTERM'): Promise<void> => {
    const proc = child;
    if (proc === undefined) return;
    proc.kill(signal);
    await exited;
  };

  await start();
  return {
    endpoint,
    dataDir,
    url: (prefix) => `etcd://${endpoint}${prefix ?? ''}`,
    get running() {
      return child !== undefined;
    },
    start,
    stop,
    destroy: async () => {
      await stop('SIGKILL');
      await rm(dataDir, { recursive: true, force: true });
    },
    log: () => output,
  };
}

export interface TcpProxy {
  /** host:port to give the client instead of the real endpoint. */
  readonly endpoint: string;
  /** Drops every connection through the proxy and refuses new ones. */
  cut(): void;
  restore(): void;
  close(): Promise<void>;
}

export async function startProxy(target: string): Promise<TcpProxy> {
  const [host, port] = [target.slice(0, target.lastIndexOf(':')), Number(target.slice(target.lastIndexOf(':') + 1))];
  const sockets = new Set<Socket>();
  let down = false;
  const server = createServer((client) => {
    if (down) {
      client.destroy();
      return;
    }
    const upstream = connect(port, host);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('error', () => undefined);
      s.on('close', () => {
        sockets.delete(s);
        client.destroy();
        upstream.destroy();
      });
    }
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const addr = server.address();
  const endpoint = `127.0.0.1:${typeof addr === 'object' && addr !== null ? addr.port : 0}`;
  return {
    endpoint,
    cut: () => {
      down = true;
      for (const s of sockets) s.destroy();
    },
    restore: () => {
      down = false;
    },
    close: async () => {
      down = true;
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
