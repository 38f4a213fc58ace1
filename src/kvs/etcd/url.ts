/**
 * `etcd://HOST[:PORT][,HOST[:PORT]...][/PREFIX]`: the etcd members to try and
 * the key prefix under which this deployment keeps its namespaces (default
 * `/dyad`), so several deployments, or test runs, can share one etcd cluster
 * without seeing each other. IPv6 hosts go in brackets.
 */
import { ConfigError } from '../../errors.js';

export const DEFAULT_ETCD_PORT = 2379;
export const DEFAULT_ETCD_PREFIX = '/dyad';

export interface EtcdUrl {
  /** host:port of every member, as given. */
  endpoints: string[];
  /** Key prefix without a trailing '/', e.g. '/dyad'. */
  prefix: string;
}

const HOST_RE = /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(\d+))?$/;

/** `label` names the URL in messages (a caller may say which flag or variable gave it). */
export function parseEtcdUrl(url: string, label = `KVS URL ${JSON.stringify(url)}`): EtcdUrl {
  const m = /^etcd:\/\/([^/]*)(\/.*)?$/i.exec(url);
  if (m === null) {
    if (/^etcds:/i.test(url)) throw new ConfigError(`${label}: TLS to etcd (etcds://) is not supported yet; use etcd:// on a private network`);
    throw new ConfigError(`${label} is not etcd://HOST[:PORT][,HOST[:PORT]...][/PREFIX]`);
  }
  const hostList = m[1]!;
  if (hostList.includes('@')) throw new ConfigError(`${label}: etcd user names and passwords are not supported`);
  const endpoints: string[] = [];
  for (const part of hostList.split(',')) {
    if (part.trim() === '') throw new ConfigError(`${label}: missing host (expected etcd://HOST[:PORT][,HOST[:PORT]...])`);
    const h = HOST_RE.exec(part.trim());
    if (h === null) throw new ConfigError(`${label}: ${JSON.stringify(part)} is not HOST[:PORT]`);
    const port = h[2] === undefined ? DEFAULT_ETCD_PORT : Number(h[2]);
    if (port < 1 || port > 65535) throw new ConfigError(`${label}: port ${port} is out of range (1-65535)`);
    endpoints.push(`${h[1]!}:${port}`);
  }
  const prefix = (m[2] ?? DEFAULT_ETCD_PREFIX).replace(/\/+$/, '');
  if (/[\0?#]/.test(prefix) || prefix.includes('//')) {
    throw new ConfigError(`${label}: the key prefix ${JSON.stringify(prefix)} must not contain NUL, '?', '#' or '//'`);
  }
  return { endpoints, prefix };
}
