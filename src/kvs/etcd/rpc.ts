/**
 * How the etcd backend talks to the etcd3 client: fault-handling policies
 * that leave retrying to us (the etcd3 defaults open a 5 s circuit breaker
 * after three failures, which would hold every request back for seconds after
 * an etcd restart), and the mapping of etcd and gRPC failures onto the KVS
 * error vocabulary.
 */
import {
  EtcdPermissionDeniedError,
  EtcdAuthenticationFailedError,
  GRPCDeadlineExceededError,
  GRPCInvalidArgumentError,
  GRPCUnavailableError,
  isRecoverableError,
  type IOptions,
  type KVClient,
} from 'etcd3';
import { DyadError } from '../../errors.js';
import { kvsError } from '../errors.js';

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
          if (i >= attempts || !(err instanceof Error) || !isRecoverableError(err)) throw err;
        }
      }
    },
  };
}

/** Failures worth retrying: the member is unreachable, restarting, electing or overloaded. */
export function isTransient(err: unknown): boolean {
  if (!(err instanceof Error) || err instanceof DyadError) return false;
  if (/database space exceeded|too many operations|request is too large/.test(err.message)) return false;
  return isRecoverableError(err);
}

export function isUnreachable(err: unknown): boolean {
  return err instanceof GRPCUnavailableError;
}

/** A failure that retrying will not cure, as a DyadError naming the members. */
export function etcdFailure(endpoints: string, what: string, err: unknown): DyadError {
  if (err instanceof DyadError) return err;
  const msg = err instanceof Error ? err.message : String(err);
  const where = `etcd at ${endpoints}`;
  if (err instanceof EtcdPermissionDeniedError || err instanceof EtcdAuthenticationFailedError) {
    return kvsError('DYAD_EACCES', 'EACCES', `${where} refused ${what}: ${msg}`, err);
  }
  if (/too many operations in txn request/.test(msg)) {
    return kvsError('DYAD_EINVAL', 'EINVAL', `${where} refused ${what}: the path is too deep for one etcd transaction (raise etcd's --max-txn-ops): ${msg}`, err);
  }
  if (err instanceof GRPCInvalidArgumentError) return kvsError('DYAD_EINVAL', 'EINVAL', `${where} refused ${what}: ${msg}`, err);
  return kvsError('DYAD_EIO', 'EIO', `${where} failed ${what}: ${msg}`, err);
}

/** The retry budget ran out: unreachable (ECONNREFUSED) or reachable but too slow (ETIMEDOUT). */
export function etcdGaveUp(endpoints: string, what: string, ms: number, err: unknown): DyadError {
  const msg = err instanceof Error ? err.message : String(err);
  if (isUnreachable(err)) {
    return kvsError('DYAD_ECONNREFUSED', 'ECONNREFUSED', `cannot reach etcd at ${endpoints} for ${what} within ${ms} ms: ${msg}`, err);
  }
  const why = err instanceof GRPCDeadlineExceededError ? 'no answer' : msg;
  return kvsError('DYAD_ETIMEDOUT', 'ETIMEDOUT', `etcd at ${endpoints} did not complete ${what} within ${ms} ms: ${why}`, err);
}
