/**
 * Errors that cross a layer carry an errno (what a FUSE reply or a process
 * exit should report) and a stable string code (what logs, tests and callers
 * match on). The message names the thing that went wrong.
 */
import { constants } from 'node:os';

export const errnos = constants.errno;

export class DyadError extends Error {
  readonly errno: number;
  readonly code: string;
  constructor(code: string, errno: number, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'DyadError';
    this.code = code;
    this.errno = errno;
  }
}

/** Bad configuration or command-line input: stops a start with one line. */
export class ConfigError extends DyadError {
  constructor(message: string, errno: number = errnos.EINVAL) {
    super('DYAD_ECONFIG', errno, message);
    this.name = 'ConfigError';
  }
}

/** Maps anything thrown (Node system errors, DyadError) to a positive errno. */
export function errnoOf(err: unknown, fallback: number = errnos.EIO): number {
  if (err instanceof DyadError) return err.errno;
  if (typeof err === 'object' && err !== null) {
    const e = err as { errno?: unknown; code?: unknown };
    if (typeof e.code === 'string' && e.code in errnos) {
      return errnos[e.code as keyof typeof errnos];
    }
    if (typeof e.errno === 'number' && e.errno !== 0) return Math.abs(e.errno);
  }
  return fallback;
}

/** The errno name (ENOENT...) for a positive errno, for messages. */
export function errnoName(errno: number): string {
  for (const [name, value] of Object.entries(errnos)) if (value === errno) return name;
  return `errno ${errno}`;
}
