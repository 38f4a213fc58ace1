/**
 * How the etcd backend talks to the etcd3 client: loading it only when an
 * etcd:// KVS is opened (etcd3 with gRPC and its protobuf definitions takes
 * ~100 ms to load, which every process importing the KVS layer would pay),
 * fault-handling policies that leave retrying to us (the etcd3 defaults open a
 * 5 s circuit breaker after three failures, which would hold every request back
 * for seconds after an etcd restart), and the mapping of etcd and gRPC failures
 * onto the KVS error vocabulary.
 */
import type { IOptions, KVClient } from 'etcd3';
import { DyadError } from '../../errors.js';
import { kvsError } from '../errors.js';

export type Etcd3Module = typeof import('etcd3');

let loaded: Etcd3Module | undefined;

export async function loadEtcd3(): Promise<Etcd3Module> {
  return (loaded ??= await import('etcd3'));
}

/** The module, once loadEtcd3() has run (every EtcdKvs is made after it). */
function lib(): Etcd3Module {
  if (loaded === undefined) throw new Error('etcd3 is used before loadEtcd3()');
  return loaded;
}

/** gRPC call options (deadline), named without importing @grpc/grpc-js ourselves. */
export type CallOptions = NonNullable<Parameters<KVClient['range']>[1]>;

type Policy = ReturnType<NonNullable<NonNullable<IOptions['faultHandling']>['host']>>;
type PolicyContext = Parameters<Parameters<Policy['execute']>[0]>[0];

function noDisposable(): { dispose(): void } {
  return { dispose: () => undefined };
}

/**
 * Runs each call once, or up to `attempts` times on a transient failure. The
 * etcd3 pool hands every retry of one call the next member, so attempts =
 * member count fails over across the cluster immediately; anything slower is
 * our own retry loop's business.
 */
export function retryPolicy(attempts: number): Policy {
  return {
    _altReturn: undefined as never,
    onSuccess: noDisposable,
    onFailure: noDisposable,
    async execute<T>(fn: (context: PolicyContext) => PromiseLike<T> | T, signal?: AbortSignal): Promise<T> {
      const ctx: PolicyContext = { signal: signal ?? new AbortController().signal };
      for (let i = 1; ; i++) {
        try {
          return await fn(ctx);
        } catch (err) {
          if (i >= attempts || !(err instanceof Error) || !lib().isRecoverableError(err)) throw err;
        }
      }
    },
  };
}

/** Failures worth retrying: the member is unreachable, restarting, electing or overloaded. */
export function isTransient(err: unknown): boolean {
  if (!(err instanceof Error) || err instanceof DyadError) return false;
  if (/database space exceeded|too many operations|request is too large/.test(err.message)) return false;
  return lib().isRecoverableError(err);
}

export function isUnreachable(err: unknown): boolean {
  return err instanceof lib().GRPCUnavailableError;
}

/** A failure that retrying will not cure, as a DyadError naming the members. */
export function etcdFailure(endpoints: string, what: string, err: unknown): DyadError {
  if (err instanceof DyadError) return err;
  const msg = err instanceof Error ? err.message : String(err);
  const where = `etcd at ${endpoints}`;
  const { EtcdPermissionDeniedError, EtcdAuthenticationFailedError, GRPCInvalidArgumentError } = lib();
  if (err instanceof EtcdPermissionDeniedError || err instanceof EtcdAuthenticationFailedError) {
    return kvsError('DYAD_EACCES', 'EACCES', `${where} refused ${what}: ${msg}`, err);
  }
  if (/too many operations in txn request/.test(msg)) {
    return kvsError('DYAD_EINVAL', 'EINVAL', `${where} refused ${what}: the path is too deep for one etcd transaction (raise etcd's --max-txn-ops): ${msg}`, err);
  }
  if (err instanceof GRPCInvalidArgumentError) return kvsError('DYAD_EINVAL', 'EINVAL', `${where} refused ${what}: ${msg}`, err);
  return kvsError('DYAD_EIO', 'EIO', `${where} failed ${what}: ${msg}`, err);
}

/**
 * The retry budget ran out: unreachable (ECONNREFUSED) if any attempt was refused,
 * else too slow (ETIMEDOUT). A call made while gRPC is still reconnecting waits
 * for its deadline, so an unreachable etcd can also end as a bare timeout.
 */
export function etcdGaveUp(endpoints: string, what: string, ms: number, err: unknown, refused: boolean): DyadError {
  const msg = err instanceof Error ? err.message : String(err);
  if (refused || isUnreachable(err)) {
    return kvsError('DYAD_ECONNREFUSED', 'ECONNREFUSED', `cannot reach etcd at ${endpoints} for ${what} within ${ms} ms: ${msg}`, err);
  }
  const why = err instanceof lib().GRPCDeadlineExceededError ? 'no answer' : msg;
  return kvsError('DYAD_ETIMEDOUT', 'ETIMEDOUT', `etcd at ${endpoints} did not complete ${what} within ${ms} ms: ${why}`, err);
}
