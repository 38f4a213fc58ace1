/**
 * The daemon's configuration: command-line flags win over DYAD's environment
 * variables, which win over defaults, and every value remembers where it came
 * from so `dyad config` can say. Invalid values stop the start with one line
 * naming the setting.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ConfigError, errnos, pathError } from '../errors.js';
import { MAX_PUSHED_BYTES } from '../kvs/embedded/protocol.js';
import { parseDyadUrl } from '../kvs/embedded/client.js';
import { parseEtcdUrl } from '../kvs/etcd/url.js';
import { checkNamespace } from '../kvs/validate.js';
import type { CachePolicyName } from '../dmd/cache.js';

export type Source = 'flag' | 'env' | 'default';

export interface Setting<T> {
  value: T;
  source: Source;
  /** The flag or variable it came from. */
  from?: string;
}

/** Flags as commander hands them over (strings, or booleans for switches). */
export interface Flags {
  storage?: string;
  rank?: string;
  kvs?: string;
  kvsServe?: string;
  kvsData?: string;
  namespace?: string;
  dtl?: string;
  listen?: string;
  sharedStorage?: boolean;
  asyncPublish?: boolean;
  fsyncWrite?: boolean;
  serviceMux?: string;
  keyDepth?: string;
  keyBins?: string;
  waitTimeout?: string;
  peerTimeout?: string;
  pushMax?: string;
  origin?: string;
  cacheCapacity?: string;
  cachePolicy?: string;
  cacheLowWatermark?: string;
  cacheGracePeriod?: string;
}

export interface DyadConfig {
  mountpoint: Setting<string | undefined>;
  storage: Setting<string | undefined>;
  rank: Setting<number>;
  kvs: Setting<string | undefined>;
  kvsServe: Setting<string | undefined>;
  kvsData: Setting<string>;
  namespace: Setting<string>;
  dtl: Setting<'TCP' | 'UCX'>;
  listen: Setting<string>;
  sharedStorage: Setting<boolean>;
  asyncPublish: Setting<boolean>;
  fsyncWrite: Setting<boolean>;
  serviceMux: Setting<number>;
  keyDepth: Setting<number>;
  keyBins: Setting<number>;
  waitTimeoutMs: Setting<number | undefined>;
  peerTimeoutMs: Setting<number>;
  pushMaxBytes: Setting<number>;
  origin: Setting<string | undefined>;
  cacheCapacityBytes: Setting<number>;
  cachePolicy: Setting<CachePolicyName>;
  cacheLowWatermark: Setting<number>;
  cacheGraceMs: Setting<number>;
}

type Env = NodeJS.ProcessEnv;

function pick<T>(flag: string | undefined, flagName: string, env: Env, vars: string[], parse: (v: string, name: string) => T, dflt: T): Setting<T> {
  if (flag !== undefined) return { value: parse(flag, flagName), source: 'flag', from: flagName };
  for (const v of vars) {
    const raw = env[v];
    if (raw !== undefined && raw !== '') return { value: parse(raw, v), source: 'env', from: v };
  }
  return { value: dflt, source: 'default' };
}

/** DYAD's booleans are "set means true", whatever the value (even 0). */
function pickBool(flag: boolean | undefined, flagName: string, env: Env, v: string): Setting<boolean> {
  if (flag) return { value: true, source: 'flag', from: flagName };
  if (env[v] !== undefined) return { value: true, source: 'env', from: v };
  return { value: false, source: 'default' };
}

function int(min: number, max = Number.MAX_SAFE_INTEGER) {
  return (v: string, name: string): number => {
    const n = Number(v);
    if (!/^-?\d+$/.test(v.trim()) || n < min || n > max) {
      throw new ConfigError(`${name}=${v}: expected an integer from ${min}${max < Number.MAX_SAFE_INTEGER ? ` to ${max}` : ''}`);
    }
    return n;
  };
}

/**
 * Node's timers hold at most 2^31-1 ms (about 24.8 days): a longer delay
 * fires after 1 ms instead, with a TimeoutOverflowWarning, so a duration
 * that ends up in a timer must stay below it.
 */
export const MAX_TIMER_MS = 2 ** 31 - 1;

/** What a duration in `unit`s (of `unitMs` ms each) may be at most, for messages. */
export function timerLimit(unitMs: number, unit: string): string {
  return `at most ${Math.floor(MAX_TIMER_MS / unitMs)} ${unit} (about 24.8 days, the limit of Node's timers)`;
}

/** A duration in milliseconds for a timer: a positive one never rounds to 0, which would mean at once (or off). */
export function timerMs(ms: number): number {
  return ms > 0 ? Math.max(1, Math.round(ms)) : 0;
}

function seconds(v: string, name: string): number {
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n) || n <= 0) throw new ConfigError(`${name}=${v}: expected a number of seconds > 0`);
  if (n * 1000 > MAX_TIMER_MS) throw new ConfigError(`${name}=${v}: expected ${timerLimit(1000, 'seconds')}`);
  return timerMs(n * 1000);
}

export function parseHostPort(v: string, name: string): string {
  if (!/^(\[[0-9a-fA-F:.]+\]|[^:\s]+):\d{1,5}$/.test(v) || Number(v.slice(v.lastIndexOf(':') + 1)) > 65535) {
    throw new ConfigError(`${name}=${v}: expected HOST:PORT`);
  }
  return v;
}

/** DYAD matches DTL modes by case-sensitive prefix; FLUX_RPC is our TCP transport. */
export function parseDtl(v: string, name: string): 'TCP' | 'UCX' {
  const modes: Array<[string, 'TCP' | 'UCX']> = [
    ['FLUX_RPC', 'TCP'],
    ['TCP', 'TCP'],
    ['UCX', 'UCX'],
  ];
  if (v === '') return 'TCP';
  for (const [mode, dtl] of modes) if (mode.startsWith(v)) return dtl;
  throw new ConfigError(`${name}=${v}: unknown transfer mode (expected TCP, FLUX_RPC or UCX)`);
}

/** A byte count: DYAD's plain integer, or with a binary suffix (K, M, G, T; "KiB" and "KB" alike). */
export function parseBytes(v: string, name: string): number {
  const m = /^\s*(\d+)\s*(?:([kmgt])(?:i?b)?)?\s*$/i.exec(v);
  const n = m ? Number(m[1]) * 1024 ** ' kmgt'.indexOf((m[2] ?? ' ').toLowerCase()) : NaN;
  if (!Number.isSafeInteger(n)) throw new ConfigError(`${name}=${v}: expected a number of bytes, optionally with K, M, G or T`);
  return n;
}

/** DYAD matches cache policies as it does DTL modes: by case-sensitive prefix. */
export function parseCachePolicy(v: string, name: string): CachePolicyName {
  if (v === '') return 'LRU';
  for (const p of ['LRU', 'FIFO', 'NONE'] as const) if (p.startsWith(v)) return p;
  throw new ConfigError(`${name}=${v}: unknown cache policy (expected LRU, FIFO or NONE)`);
}

function fraction(v: string, name: string): number {
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n) || n <= 0 || n > 1) throw new ConfigError(`${name}=${v}: expected a fraction above 0 and at most 1`);
  return n;
}

/** Seconds that may be 0, for a grace period (no timer holds them). */
function secondsOrZero(v: string, name: string): number {
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n) || n < 0) throw new ConfigError(`${name}=${v}: expected a number of seconds >= 0`);
  return Math.round(n * 1000);
}

/** The KVS's own rule (its secret file is named after the namespace), so `dyad config` and a start agree. */
function namespace(v: string, name: string): string {
  try {
    checkNamespace(v);
  } catch {
    throw new ConfigError(`${name}=${v}: a namespace is 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit`);
  }
  return v;
}

/**
 * A KVS another process serves: the embedded one (dyad://) or etcd. Checked
 * whole here, so a bad URL is reported as such and not as whatever fails
 * first while using it (a secret lookup, a connection).
 */
export function parseKvsUrl(v: string, name: string): string {
  const label = `${name}=${v}`;
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(v)?.[1]?.toLowerCase();
  if (scheme === 'dyad') parseDyadUrl(v, label);
  else if (scheme === 'etcd' || scheme === 'etcds') parseEtcdUrl(v, label);
  else {
    throw new ConfigError(
      `${label}: ${scheme === undefined ? 'not a URL' : `unsupported scheme ${scheme}:`}; expected dyad://HOST:PORT or etcd://HOST:PORT[,HOST:PORT...]`,
    );
  }
  // Callers pick the backend by a lower-case prefix.
  return scheme + v.slice(scheme.length);
}

/** Creates a data directory (mode 0700) unless it exists; one line naming the setting if it cannot be one. */
export function makeDataDir(dir: string, setting: string): void {
  try {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  } catch (err) {
    // mkdir -p reports a file in the way as EEXIST: something is there, but not a directory.
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw new ConfigError(`${setting} ${dir}: not a directory`, errnos.ENOTDIR);
    throw pathError(setting, dir, 'cannot create', err);
  }
}

export function defaultKvsData(): string {
  const state = process.env.XDG_STATE_HOME || path.join(os.homedir(), '.local', 'state');
  return path.join(state, 'dyad-fs', 'kvs');
}

/** DYAD's key scheme alone: all `dyad kvs serve` takes of the daemon's settings. */
export function resolveKeyParams(f: Pick<Flags, 'keyDepth' | 'keyBins'>, env: Env = process.env): Pick<DyadConfig, 'keyDepth' | 'keyBins'> {
  return {
    keyDepth: pick(f.keyDepth, '--key-depth', env, ['DYAD_KEY_DEPTH'], int(0, 64), 3),
    keyBins: pick(f.keyBins, '--key-bins', env, ['DYAD_KEY_BINS'], int(1, 0xffffffff), 1024),
  };
}

export function resolveConfig(mountpoint: string | undefined, f: Flags, env: Env = process.env): DyadConfig {
  const mp: Setting<string | undefined> =
    mountpoint !== undefined
      ? { value: mountpoint, source: 'flag', from: 'MOUNTPOINT' }
      : env.DYAD_PATH_CONSUMER
        ? { value: env.DYAD_PATH_CONSUMER, source: 'env', from: 'DYAD_PATH_CONSUMER' }
        : env.DYAD_PATH_PRODUCER
          ? { value: env.DYAD_PATH_PRODUCER, source: 'env', from: 'DYAD_PATH_PRODUCER' }
          : { value: undefined, source: 'default' };
  const cfg: DyadConfig = {
    mountpoint: mp,
    storage: pick(f.storage, '--storage', env, [], (v) => v, undefined as string | undefined),
    rank: pick(f.rank, '--rank', env, ['DYAD_RANK', 'FLUX_TASK_RANK', 'SLURM_NODEID', 'PMI_RANK'], int(0), 0),
    kvs: pick(f.kvs, '--kvs', env, ['DYAD_KVS'], parseKvsUrl, undefined as string | undefined),
    kvsServe: pick(f.kvsServe, '--kvs-serve', env, [], parseHostPort, undefined as string | undefined),
    kvsData: pick(f.kvsData, '--kvs-data', env, ['DYAD_KVS_DATA'], (v) => path.resolve(v), defaultKvsData()),
    namespace: pick(f.namespace, '--namespace', env, ['DYAD_KVS_NAMESPACE'], namespace, 'dyad'),
    // DYAD_DTL_MODE is matched as DYAD does (case-sensitive); the flag is ours and takes `--dtl ucx` too.
    dtl: pick(f.dtl?.toUpperCase(), '--dtl', env, ['DYAD_DTL_MODE'], parseDtl, 'TCP' as const),
    listen: pick(f.listen, '--listen', env, ['DYAD_LISTEN'], parseHostPort, '127.0.0.1:0'),
    sharedStorage: pickBool(f.sharedStorage, '--shared-storage', env, 'DYAD_SHARED_STORAGE'),
    asyncPublish: pickBool(f.asyncPublish, '--async-publish', env, 'DYAD_ASYNC_PUBLISH'),
    fsyncWrite: pickBool(f.fsyncWrite, '--fsync-write', env, 'DYAD_FSYNC_WRITE'),
    // DYAD turns values below 1 into 1; we say so instead.
    serviceMux: pick(f.serviceMux, '--service-mux', env, ['DYAD_SERVICE_MUX'], int(1), 1),
    ...resolveKeyParams(f, env),
    waitTimeoutMs: pick(f.waitTimeout, '--wait-timeout', env, ['DYAD_WAIT_TIMEOUT'], seconds, undefined as number | undefined),
    peerTimeoutMs: pick(f.peerTimeout, '--peer-timeout', env, ['DYAD_PEER_TIMEOUT'], seconds, 10_000),
    // One small file costs far less on the wire than the round trip it saves.
    pushMaxBytes: pick(f.pushMax, '--push-max', env, ['DYAD_PUSH_MAX'], int(0, MAX_PUSHED_BYTES), 16 << 10),
    // Checked at start (it must be a directory outside the mount): see Daemon.
    origin: pick(f.origin, '--origin', env, ['DYAD_PATH_ORIGIN'], (v) => path.resolve(v), undefined as string | undefined),
    // DYAD's cache eviction; here it evicts copies of other nodes' files only (src/dmd/cache.ts).
    cacheCapacityBytes: pick(f.cacheCapacity, '--cache-capacity', env, ['DYAD_CACHE_CAPACITY'], parseBytes, 0),
    cachePolicy: pick(f.cachePolicy, '--cache-policy', env, ['DYAD_CACHE_POLICY'], parseCachePolicy, 'LRU' as CachePolicyName),
    cacheLowWatermark: pick(f.cacheLowWatermark, '--cache-low-watermark', env, ['DYAD_CACHE_LOW_WATERMARK'], fraction, 0.8),
    cacheGraceMs: pick(f.cacheGracePeriod, '--cache-grace-period', env, ['DYAD_CACHE_GRACE_PERIOD'], secondsOrZero, 5000),
  };
  if (cfg.kvs.value && cfg.kvsServe.value) {
    throw new ConfigError('--kvs and --kvs-serve exclude each other: a daemon either serves the embedded KVS or uses one');
  }
  return cfg;
}

/** The table `dyad config` prints. */
export function describeConfig(cfg: DyadConfig): string {
  const rows = Object.entries(cfg).map(([k, s]) => {
    const st = s as Setting<unknown>;
    const value = st.value === undefined ? '(unset)' : String(st.value);
    return [k, value, st.source + (st.from ? ` (${st.from})` : '')];
  });
  const w0 = Math.max(...rows.map((r) => r[0]!.length));
  const w1 = Math.max(...rows.map((r) => r[1]!.length));
  return rows.map((r) => `${r[0]!.padEnd(w0)}  ${r[1]!.padEnd(w1)}  ${r[2]}`).join('\n');
}
