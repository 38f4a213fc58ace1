/**
 * The KVS layer's error vocabulary. Every backend (in-process, embedded server,
 * later etcd) raises the same codes so callers and tests match on `code` alone,
 * and the errno is what a FUSE reply for the failed operation should carry.
 */
import { DyadError, errnos } from '../errors.js';

export const KVS_ERROR_CODES = [
  'DYAD_ENONS', // namespace missing (ENOENT)
  'DYAD_ENOENT', // path missing where it must exist (ENOENT)
  'DYAD_EEXIST', // namespace already exists
  'DYAD_ENOTDIR', // a path component is a published file
  'DYAD_EISDIR', // the path is a directory
  'DYAD_EINVAL', // malformed argument
  'DYAD_EACCES', // not authenticated or wrong secret
  'DYAD_ETIMEDOUT', // wait or request deadline passed
  'DYAD_EINTR', // wait aborted by its signal
  'DYAD_ECONNRESET', // connection lost with a non-retriable request in flight
  'DYAD_ECONNREFUSED', // server unreachable at open
  'DYAD_ECLOSED', // the Kvs handle was closed
  'DYAD_EPROTO', // peer broke the wire protocol
  'DYAD_EIO', // the server could not persist
  'DYAD_EAGAIN', // a per-connection limit was reached
] as const;
export type KvsErrorCode = (typeof KVS_ERROR_CODES)[number];

export function kvsError(code: KvsErrorCode, errnoName: keyof typeof errnos, message: string, cause?: unknown): DyadError {
  return new DyadError(code, errnos[errnoName], message, cause === undefined ? undefined : { cause });
}

export function noNamespace(ns: string): DyadError {
  return kvsError('DYAD_ENONS', 'ENOENT', `KVS namespace ${JSON.stringify(ns)} does not exist`);
}

export function invalidArgument(message: string): DyadError {
  return kvsError('DYAD_EINVAL', 'EINVAL', message);
}

export function timedOut(what: string, ms: number): DyadError {
  return kvsError('DYAD_ETIMEDOUT', 'ETIMEDOUT', `${what} timed out after ${ms} ms`);
}

export function interrupted(what: string): DyadError {
  return kvsError('DYAD_EINTR', 'EINTR', `${what} was aborted`);
}

export function accessDenied(message: string): DyadError {
  return kvsError('DYAD_EACCES', 'EACCES', message);
}

export function closedError(what = 'KVS handle'): DyadError {
  return kvsError('DYAD_ECLOSED', 'ECANCELED', `${what} is closed`);
}

export function protocolError(message: string): DyadError {
  return kvsError('DYAD_EPROTO', 'EPROTO', message);
}

export function isDyadError(err: unknown, code?: string): err is DyadError {
  return err instanceof DyadError && (code === undefined || err.code === code);
}
