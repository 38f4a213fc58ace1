/**
 * The DYAD settings shared by `dyad-mount` and `dyad config`, so both
 * accept the same flags and resolve them the same way (src/node/config.ts).
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { MAX_TIMER_MS, timerLimit, timerMs } from '../node/config.js';

/**
 * A commander parser for a flag taking a number >= 0 that no Node timer
 * holds (a kernel cache time, a spin), at most `max`.
 */
export function positiveNumber(name: string, max = Number.MAX_VALUE) {
  return (v: string): number => {
    const n = Number(v);
    if (v.trim() === '' || !Number.isFinite(n) || n < 0) throw new InvalidArgumentError(`${name} must be a number >= 0`);
    if (n > max) throw new InvalidArgumentError(`${name} must be at most ${max}`);
    return n;
  };
}

/**
 * A commander parser for a duration that a Node timer will hold, given in
 * `unit`s: returns milliseconds, at least 1 for any positive value and at
 * most MAX_TIMER_MS. `zero` says whether 0 means something (off, at once)
 * or would turn the timer into a busy loop.
 */
export function timerFlag(name: string, unit: 'seconds' | 'milliseconds', o: { zero: boolean }) {
  const unitMs = unit === 'seconds' ? 1000 : 1;
  return (v: string): number => {
    const n = Number(v);
    if (v.trim() === '' || !Number.isFinite(n) || n < 0 || (n === 0 && !o.zero)) {
      throw new InvalidArgumentError(`${name} must be a number ${o.zero ? '>= 0' : '> 0'}`);
    }
    if (n * unitMs > MAX_TIMER_MS) throw new InvalidArgumentError(`${name} must be ${timerLimit(unitMs, unit)}`);
    return timerMs(n * unitMs);
  };
}

/**
 * A usage error is one line, like every other error: the whole help after
 * it (52 lines for `dyad config`) would bury it. Set on a program before its
 * subcommands are added, which inherit it.
 */
export function oneLineUsageErrors(cmd: Command): Command {
  const name = cmd.name();
  return cmd.configureOutput({
    outputError: (str, write) => write(`${name}: ${str.trim().replace(/^error: /, '').replace(/\s*\n\s*/g, ' ')} (see --help)\n`),
  });
}

export function addDyadOptions(cmd: Command): Command {
  return cmd
    .option('--storage <dir>', "serve this directory instead of the mountpoint's own contents")
    .option('--rank <n>', 'this node\'s rank (default: DYAD_RANK, FLUX_TASK_RANK, SLURM_NODEID, PMI_RANK, else 0)')
    .option('--kvs <url>', 'use this KVS: dyad://HOST:PORT (embedded KVS served by another daemon) or etcd://HOST:PORT[,...]')
    .option('--kvs-serve <host:port>', 'serve the embedded KVS here (default without --kvs: 127.0.0.1, any free port)')
    .option('--kvs-data <dir>', 'where a served embedded KVS keeps its data and secrets (default ~/.local/state/dyad-fs/kvs)')
    .option('--secret-file <file>', 'namespace secret for a KVS served elsewhere (default: DYAD_SECRET, DYAD_SECRET_FILE, <kvs-data>/secrets/<ns>.secret)')
    .option('--namespace <name>', 'KVS namespace (DYAD_KVS_NAMESPACE; default dyad)')
    .option('--dtl <mode>', 'transfer: TCP (also FLUX_RPC) or UCX (DYAD_DTL_MODE; default TCP)')
    .option('--listen <host:port>', 'address of this node\'s transfer service (default 127.0.0.1:0; use a reachable address across hosts)')
    .option('--shared-storage', 'storage is shared by all nodes: synchronise only, never transfer (DYAD_SHARED_STORAGE)')
    .option('--async-publish', 'close() does not wait for the publication (DYAD_ASYNC_PUBLISH)')
    .option('--fsync-write', 'fsync written files before publishing them (DYAD_FSYNC_WRITE)')
    .option('--service-mux <n>', 'ranks per node sharing one storage (DYAD_SERVICE_MUX)')
    .option('--key-depth <n>', 'KVS key hash levels, for a served KVS (DYAD_KEY_DEPTH; default 3)')
    .option('--key-bins <n>', 'KVS key bins per level, for a served KVS (DYAD_KEY_BINS; default 1024)')
    .option('--wait-timeout <seconds>', 'readers of unpublished files give up with ETIMEDOUT (DYAD_WAIT_TIMEOUT; default: wait forever)')
    .option('--origin <dir>', 'read-through: a file found nowhere (not local, not published) but present under DIR, e.g. a dataset on the parallel file system, is copied into storage and published for the other nodes (DYAD_PATH_ORIGIN)')
    .option('--push-max <bytes>', 'files up to this size travel with their publication to watching nodes, which then need no transfer; 0 = never (DYAD_PUSH_MAX; default 16384)')
    .option('--peer-timeout <seconds>', 'a silent or unreachable owner fails a pull with EIO after this long (default 10)')
    .option('--cache-capacity <bytes>', 'keep at most this many bytes of copies pulled from other nodes or copied from the origin (K, M, G, T suffixes); the least used go beyond it, and are fetched again when next opened; files written here are never evicted (DYAD_CACHE_CAPACITY; default 0: keep all)')
    .option('--cache-policy <policy>', 'which copies go first: LRU (least recently opened) or FIFO (first pulled); NONE never evicts (DYAD_CACHE_POLICY; default LRU)')
    .option('--cache-low-watermark <fraction>', 'evict down to this fraction of the capacity (DYAD_CACHE_LOW_WATERMARK; default 0.8)')
    .option('--cache-grace-period <seconds>', 'copies opened this recently are not evicted (DYAD_CACHE_GRACE_PERIOD; default 5)')
    .addOption(new Option('--passthrough <mode>', 'kernel passthrough for local reads and writes (needs root and Linux 6.9+)').choices(['auto', 'off']).default('auto'));
}
