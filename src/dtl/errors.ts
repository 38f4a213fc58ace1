/**
 * The DyadErrors a transfer can end with, built in one place so every
 * backend reports the same code and errno for the same situation and every
 * message names the peer and the path (what an operator needs in a log).
 */
import { DyadError, errnos, errnoName } from '../errors.js';

export const DTL_CODES = {
  peer: 'DYAD_EPEER',
  remoteMissing: 'DYAD_ENOENT_REMOTE',
  forbidden: 'DYAD_EFORBIDDEN',
  remote: 'DYAD_EREMOTE',
  auth: 'DYAD_EAUTH',
  digest: 'DYAD_EDIGEST',
  nospace: 'DYAD_ENOSPC',
  local: 'DYAD_ELOCAL',
  interrupted: 'DYAD_EINTR',
} as const;

function what(peer: string, upath: string): string {
  return `${JSON.stringify(upath)} from ${peer}`;
}

export function peerError(peer: string, upath: string, detail: string, cause?: unknown): DyadError {
  return new DyadError(DTL_CODES.peer, errnos.EIO, `pull ${what(peer, upath)}: ${detail}`, { cause });
}

export function authError(peer: string, detail: string): DyadError {
  return new DyadError(DTL_CODES.auth, errnos.EACCES, `peer ${peer}: ${detail} (is DYAD's shared secret the same on both nodes?)`);
}

export function digestError(peer: string, upath: string, detail: string): DyadError {
  return new DyadError(DTL_CODES.digest, errnos.EIO, `pull ${what(peer, upath)}: ${detail}`);
}

export function abortError(peer: string, upath: string, reason?: unknown): DyadError {
  return new DyadError(DTL_CODES.interrupted, errnos.EINTR, `pull ${what(peer, upath)}: aborted`, { cause: reason });
}

/** Maps a failure of our own file system calls (temp file, write, rename). */
export function localError(peer: string, upath: string, dest: string, err: unknown): DyadError {
  if (err instanceof DyadError) return err;
  const code = typeof err === 'object' && err !== null ? (err as { code?: unknown }).code : undefined;
  const msg = err instanceof Error ? err.message : String(err);
  if (code === 'ENOSPC' || code === 'EDQUOT') {
    return new DyadError(DTL_CODES.nospace, errnos.ENOSPC, `pull ${what(peer, upath)} into ${dest}: no space left (${msg})`, { cause: err });
  }
  const errno = typeof code === 'string' && code in errnos ? errnos[code as keyof typeof errnos] : errnos.EIO;
  return new DyadError(DTL_CODES.local, errno, `pull ${what(peer, upath)} into ${dest}: ${errnoName(errno)}: ${msg}`, { cause: err });
}

/** Remote statuses as carried on the wire; the numbers are protocol, do not renumber. */
export const RemoteStatus = {
  ok: 0,
  notFound: 1,
  forbidden: 2,
  notRegular: 3,
  io: 4,
} as const;
export type RemoteStatusCode = (typeof RemoteStatus)[keyof typeof RemoteStatus];

export function remoteError(peer: string, upath: string, status: number, detail: string): DyadError {
  const m = `pull ${what(peer, upath)}: ${detail}`;
  switch (status) {
    case RemoteStatus.notFound:
      return new DyadError(DTL_CODES.remoteMissing, errnos.EIO, m);
    case RemoteStatus.forbidden:
      return new DyadError(DTL_CODES.forbidden, errnos.EACCES, m);
    default:
      return new DyadError(DTL_CODES.remote, errnos.EIO, m);
  }
}
