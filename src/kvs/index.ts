/**
 * The KVS layer's entry point: openKvs(url) picks a backend by URL scheme, and
 * the rest of the project imports KVS types and helpers from here.
 *
 *   dyad://HOST:PORT  embedded KVS server (src/kvs/embedded)
 *   mem:  mem:NAME    in-process store, private or shared by NAME (tests)
 *   etcd://HOST:PORT[,HOST:PORT...][/PREFIX]  an etcd cluster (src/kvs/etcd)
 */
import { ConfigError } from '../errors.js';
import { CachedKvs, type CachedKvsOptions } from './cache.js';
import { EmbeddedKvsClient, type EmbeddedClientOptions } from './embedded/client.js';
import { EtcdKvs, type EtcdKvsOptions } from './etcd/client.js';
import { keyParamsFromEnv } from './key.js';
import { MemoryKvs } from './memory.js';
import type { Kvs } from './types.js';

export interface OpenKvsOptions
  extends EmbeddedClientOptions,
    Pick<EtcdKvsOptions, 'rankLeaseTtlSec' | 'watchLingerMs' | 'maxTxnOps'> {
  /** Wrap the backend in a CachedKvs (default false). */
  cache?: boolean | CachedKvsOptions;
  /**
   * Key parameters for mem: stores and for namespaces created through etcd:// (stored
   * with the namespace, which every etcd client then follows); default DYAD_KEY_DEPTH /
   * DYAD_KEY_BINS. The embedded server uses its own.
   */
  keyDepth?: number;
  keyBins?: number;
}

export async function openKvs(url: string, opts: OpenKvsOptions = {}): Promise<Kvs> {
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(url)?.[1]?.toLowerCase();
  let kvs: Kvs;
  switch (scheme) {
    case 'dyad':
      kvs = await EmbeddedKvsClient.connect(url, opts);
      break;
    case 'mem': {
      const env = keyParamsFromEnv(opts.env ?? process.env);
      kvs = MemoryKvs.open(url.slice('mem:'.length), { keyDepth: opts.keyDepth ?? env.depth, keyBins: opts.keyBins ?? env.bins });
      break;
    }
    case 'etcd':
    case 'etcds':
      // Loads etcd3 (and gRPC) on first use only.
      kvs = await EtcdKvs.connect(url, opts);
      break;
    default:
      throw new ConfigError(`unsupported KVS URL ${JSON.stringify(url)}: expected dyad://HOST:PORT, etcd://HOST:PORT or mem:[NAME]`);
  }
  if (opts.cache === undefined || opts.cache === false) return kvs;
  return new CachedKvs(kvs, opts.cache === true ? {} : opts.cache);
}

export { CachedKvs, type CacheStats, type CachedKvsOptions } from './cache.js';
export { EmbeddedKvsClient, parseDyadUrl, type EmbeddedClientOptions } from './embedded/client.js';
export { EtcdKvs, type EtcdKvsOptions, type RankEvent, type RankListener } from './etcd/client.js';
export { parseEtcdUrl, type EtcdUrl } from './etcd/url.js';
export { KvsServer, startKvsServer, type KvsServerOptions } from './embedded/server.js';
export { KvsStore, DIR_MODE } from './embedded/store.js';
export {
  adminSecretPath,
  generateSecret,
  readSecretFile,
  secretPath,
  writeSecretFile,
  SecretSource,
  type SecretOptions,
} from './embedded/secrets.js';
export { KVS_ERROR_CODES, isDyadError, type KvsErrorCode } from './errors.js';
export {
  checkKeyParams,
  DEFAULT_KEY_BINS,
  DEFAULT_KEY_DEPTH,
  genPathKey,
  keyParamsFromEnv,
  type KeyParams,
} from './key.js';
export { MemoryKvs } from './memory.js';
export { murmur3x64_128, murmur3x64_128Words, type Murmur3Options } from './murmur3.js';
export { baseName, checkUpath, joinUpath, parentOf, upathOf } from './upath.js';
export { checkNamespace } from './validate.js';
export * from './types.js';
