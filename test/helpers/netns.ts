/**
 * Several test hosts on one machine: each host is a network namespace with
 * one veth interface, plugged into a bridge that lives in a namespace of its
 * own, with private addresses that exist only inside those namespaces. The
 * harness creates everything and removes it at teardown.
 *
 * Daemons enter a host's network namespace with nsenter --net (not
 * `ip netns exec`, which also makes a private mount namespace and would hide
 * their FUSE mounts from everyone else); mounts stay visible machine-wide.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { mountCli, tmpdir, type CliMount } from './mount.js';

interface Tap {
  teardown(fn: () => unknown): void;
}

function ip(...args: string[]): void {
  execFileSync('ip', args, { stdio: 'pipe' });
}

export interface Host {
  index: number;
  ns: string;
  addr: string;
  /** Prefix for running a command inside this host's network namespace. */
  enter: string[];
}

export interface Network {
  id: number;
  hosts: Host[];
  switchNs: string;
}

let counter = 0;

/** Creates `n` hosts on a private /24; removed at teardown. */
export function network(t: Tap, n: number): Network {
  // A subnet and names unique to this process and call, so parallel test
  // files never collide.
  const id = ((process.pid % 200) + counter++ * 7) % 250;
  const tag = `${process.pid % 100000}x${counter}`;
  const switchNs = `dyadsw-${tag}`;
  const bridge = 'br0';
  const hosts: Host[] = [];
  const created: string[] = [];
  const cleanup = () => {
    for (const ns of created.reverse()) spawnSync('ip', ['netns', 'del', ns]);
  };
  t.teardown(cleanup);
  ip('netns', 'add', switchNs);
  created.push(switchNs);
  ip('-n', switchNs, 'link', 'add', bridge, 'type', 'bridge');
  ip('-n', switchNs, 'link', 'set', bridge, 'up');
  for (let i = 0; i < n; i++) {
    const ns = `dyadh-${tag}-${i}`;
    ip('netns', 'add', ns);
    created.push(ns);
    const addr = `10.199.${id}.${i + 1}`;
    // Create the pair inside the host namespace, then move the peer out.
    ip('-n', ns, 'link', 'add', 'eth0', 'type', 'veth', 'peer', 'name', `p${i}`);
    ip('-n', ns, 'link', 'set', `p${i}`, 'netns', switchNs);
    ip('-n', switchNs, 'link', 'set', `p${i}`, 'master', bridge);
    ip('-n', switchNs, 'link', 'set', `p${i}`, 'up');
    ip('-n', ns, 'addr', 'add', `${addr}/24`, 'dev', 'eth0');
    ip('-n', ns, 'link', 'set', 'eth0', 'up');
    ip('-n', ns, 'link', 'set', 'lo', 'up');
    hosts.push({ index: i, ns, addr, enter: ['nsenter', `--net=/run/netns/${ns}`] });
  }
  // A veth reports its carrier a moment after both ends are up; programs that
  // list usable interfaces at start (UCX) must not look before that.
  for (const h of hosts) {
    for (let i = 0; i < 100; i++) {
      const state = execFileSync('ip', ['-n', h.ns, '-br', 'link', 'show', 'eth0'], { encoding: 'utf8' });
      if (!state.includes('NO-CARRIER')) break;
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 50);
    }
  }
  return { id, hosts, switchNs };
}

export interface HostNode extends CliMount {
  host: Host;
  storage: string;
  rank: number;
}

export interface NetCluster {
  net: Network;
  nodes: HostNode[];
  kvsUrl: string;
  secretFile: string;
  base: string;
}

/**
 * One dyad-mount daemon per host, each over its own storage. Without
 * `kvs`, host 0's daemon serves the embedded KVS on its address.
 */
export async function netCluster(t: Tap, n: number, opts: { kvs?: string; secretFile?: string; args?: string[]; net?: Network } = {}): Promise<NetCluster> {
  const net = opts.net ?? network(t, n);
  const base = tmpdir(t);
  const nodes: HostNode[] = [];
  let kvsUrl = opts.kvs ?? '';
  const secretFile = opts.secretFile ?? path.join(base, 'kvs', 'secrets', 'dyad.secret');
  for (const host of net.hosts) {
    const mnt = path.join(base, `h${host.index}`);
    const storage = path.join(base, `s${host.index}`);
    fs.mkdirSync(mnt);
    fs.mkdirSync(storage);
    const serve = !opts.kvs && host.index === 0;
    const kvsArgs = serve
      ? ['--kvs-serve', `${host.addr}:0`, '--kvs-data', path.join(base, 'kvs')]
      : ['--kvs', kvsUrl, ...(opts.kvs && !opts.secretFile ? [] : ['--secret-file', secretFile])];
    const m = await mountCli(t, mnt, [...kvsArgs, '--rank', String(host.index), '--listen', `${host.addr}:0`, '--storage', storage, ...(opts.args ?? [])], host.enter);
    if (serve) {
      const url = /serving the embedded KVS at (dyad:\/\/\S+)/.exec(fs.readFileSync(m.log, 'utf8'))?.[1];
      if (!url) throw new Error(`host 0 did not report its KVS URL`);
      kvsUrl = url;
    }
    nodes.push({ ...m, host, storage, rank: host.index });
  }
  return { net, nodes, kvsUrl, secretFile, base };
}
