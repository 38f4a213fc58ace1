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

/**
 * The errno and description of a Node system error (ENOENT...), or
 * undefined for anything else. Node's message reads "CODE: description,
 * syscall 'path'"; the description alone lets a caller name the path in
 * its own words.
 */
export function systemError(err: unknown): { errno: number; code: string; text: string } | undefined {
  if (!(err instanceof Error)) return undefined;
  const code = (err as NodeJS.ErrnoException).code;
  if (typeof code !== 'string' || !(code in errnos)) return undefined;
  const text = /^E[A-Z0-9]+: ([^,]+)/.exec(err.message)?.[1] ?? code;
  return { errno: errnos[code as keyof typeof errnos], code, text };
}

/**
 * A setting's path that the system refused, as one line naming both:
 * "--log /x/y: cannot open: no such file or directory", with the errno.
 * Anything that is not a system error is returned as it is.
 */
export function pathError(setting: string, file: string, doing: string, err: unknown): Error {
  const sys = systemError(err);
  if (!sys) return err instanceof Error ? err : new Error(String(err));
  return new ConfigError(`${setting} ${file}: ${doing}: ${sys.text}`, sys.errno);
}

/**
 * An error as the one line a command prints before exiting: never a stack,
 * and the errno's name (ENOENT...) when the error carries one, so a script
 * or a person can tell the causes apart although the exit code is always 1.
 */
export function errorLine(err: unknown): string {
  const msg = (err instanceof Error ? err.message : String(err)).trim().replace(/\s*\n\s*/g, '; ');
  const name = err instanceof DyadError ? errnoName(err.errno) : systemError(err)?.code;
  if (name === undefined || !/^E[A-Z0-9]+$/.test(name) || new RegExp(`\\b${name}\\b`).test(msg)) return msg;
  return `${msg} (${name})`;
}
