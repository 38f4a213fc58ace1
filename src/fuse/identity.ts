/**
 * Acting as the caller: a file system mounted without default_permissions
 * checks permissions itself. Ours lets the storage decide: the system calls
 * it makes for a caller run with that caller's file system identity (fsuid,
 * fsgid and supplementary groups, on the main thread only; see
 * native/src/creds.cc), so the storage's own rules apply as they would to
 * the caller: modes, ACLs, sticky directories, setgid inheritance, chown.
 *
 * Why not leave it to the kernel: with default_permissions the kernel asks
 * for the attributes of a directory again after every change in it, which
 * costs one more request (a GETATTR of the parent) for every file a
 * producer creates.
 */
import { callerGroups } from './caller.js';
import { native } from './native.js';
import type { RequestContext } from './types.js';
import { DyadError, errnoName, errnos } from '../errors.js';

let usable: boolean | undefined;

/**
 * Can this daemon act as its callers: root (with CAP_SETUID and
 * CAP_SETGID, which a container may have dropped) on Linux 5.8 or later
 * (faccessat2)? Otherwise the kernel must keep checking permissions.
 */
export function canActAsCallers(): boolean {
  usable ??= process.geteuid?.() === 0 && native.canActAs() === 0;
  return usable;
}

/** Does a request from `ctx` need checking at all? Root may do anything the kernel leaves to us. */
export function needsCheck(ctx: RequestContext): boolean {
  return ctx.uid !== 0 && canActAsCallers();
}

/**
 * Runs `fn`, which must be synchronous and make only the caller's storage
 * calls, with the caller's identity; root callers run it as is. Afterwards
 * the thread has the daemon's fsuid and fsgid again, but keeps the
 * caller's supplementary groups until another caller needs others (they
 * decide nothing for root: native/src/creds.cc).
 */
export function asCaller<T>(ctx: RequestContext, fn: () => T): T {
  if (!needsCheck(ctx)) return fn();
  const rc = native.actAs(ctx.uid, ctx.gid, callerGroups(ctx.pid));
  if (rc < 0) {
    backToSelf();
    throw new DyadError('DYAD_EPERM', -rc, `cannot act as uid ${ctx.uid} gid ${ctx.gid} (errno ${-rc})`);
  }
  try {
    return fn();
  } finally {
    backToSelf();
  }
}

function backToSelf(): void {
  // A daemon left with a caller's identity would serve everyone else as
  // that caller. Root can always return to itself, so this cannot happen;
  // if it does, stopping is the only safe answer.
  if (native.actAsSelf() < 0) process.abort();
}

/** Throws EACCES (or the storage's errno) unless the caller may `mask` (R_OK | W_OK | X_OK) the storage path `p`. */
export function checkAccess(ctx: RequestContext, p: string, mask: number, what: string): void {
  if (!needsCheck(ctx)) return;
  const rc = asCaller(ctx, () => native.accessAs(p, mask));
  if (rc < 0) {
    const name = errnoName(-rc);
    const why = -rc === errnos.EACCES ? 'permission denied' : name;
    throw new DyadError(`DYAD_${name.startsWith('E') ? name : 'EACCES'}`, -rc, `${what}: ${why} for uid ${ctx.uid}`);
  }
}
