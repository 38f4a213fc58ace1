/**
 * Where embedded-KVS secrets live and how a client finds them.
 *
 * A secret is 32 random bytes written as 64 hex digits. The server keeps each
 * namespace's secret in its journal and exports it as `<secretDir>/<ns>.secret`
 * (mode 0600, default secretDir `<dataDir>/secrets`) for clients that share the
 * file system; the admin secret is `<dataDir>/admin.secret`. A client takes the
 * secret as a value or a file path, from options or the environment:
 *
 *   DYAD_SECRET / DYAD_SECRET_FILE              the namespace secret
 *   DYAD_ADMIN_SECRET / DYAD_ADMIN_SECRET_FILE  the admin secret
 *
 * Secret files readable by group or others are refused, as ssh does with keys,
 * and error messages name files but never print a secret.
 */
import { constants } from 'node:fs';
import { lstat, mkdir, open, readFile, rename, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { ConfigError, errnos, systemError } from '../../errors.js';
import { checkNamespace } from '../validate.js';

const SECRET_RE = /^[0-9a-fA-F]{64}$/;

export function generateSecret(): string {
  return randomBytes(32).toString('hex');
}

/** Trims and validates a secret value; `source` names where it came from. */
export function parseSecret(value: string, source: string): string {
  const v = value.trim();
  if (!SECRET_RE.test(v)) throw new ConfigError(`${source} does not hold a KVS secret (expected 64 hex digits)`);
  return v.toLowerCase();
}

/** The file holding namespace ns's secret inside a secret directory. */
export function secretPath(secretDir: string, ns: string): string {
  checkNamespace(ns);
  return join(secretDir, `${ns}.secret`);
}

export function adminSecretPath(dataDir: string): string {
  return join(dataDir, 'admin.secret');
}

/** With the errno of the failure, and the path said once. */
function unreadable(file: string, err: unknown): ConfigError {
  const sys = systemError(err);
  return new ConfigError(`cannot read secret file ${file}: ${sys?.text ?? String(err)}`, sys?.errno ?? errnos.EIO);
}

export async function readSecretFile(file: string): Promise<string> {
  let st;
  try {
    st = await lstat(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new ConfigError(`secret file ${file} does not exist`, errnos.ENOENT);
    throw unreadable(file, err);
  }
  if (!st.isFile()) throw new ConfigError(`secret file ${file} is not a regular file`);
  if ((st.mode & 0o077) !== 0) {
    throw new ConfigError(
      `secret file ${file} is accessible by group or others (mode ${(st.mode & 0o777).toString(8)}); run chmod 600 on it`,
    );
  }
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw unreadable(file, err);
  }
  return parseSecret(text, `secret file ${file}`);
}

/** Atomically (re)writes a secret file with mode 0600, creating its directory with 0700. */
export async function writeSecretFile(file: string, secret: string): Promise<void> {
  await mkdir(dirname(file), { recursive: true, mode: 0o700 });
  const tmp = `${file}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  const fh = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600);
  try {
    await fh.writeFile(`${secret}\n`);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, file);
}

export async function removeSecretFile(file: string): Promise<void> {
  await rm(file, { force: true });
}

/** Reads the secret in `file`, creating it first if it does not exist (admin secret). */
export async function loadOrCreateSecretFile(file: string): Promise<string> {
  try {
    return await readSecretFile(file);
  } catch (err) {
    if (!(err instanceof ConfigError) || !/does not exist$/.test(err.message)) throw err;
  }
  const secret = generateSecret();
  await writeSecretFile(file, secret);
  return secret;
}

export interface SecretOptions {
  /** The namespace secret itself (overrides DYAD_SECRET). */
  secret?: string;
  /** A file holding the namespace secret (overrides DYAD_SECRET_FILE). */
  secretFile?: string;
  /** A server secret directory: the secret of namespace ns is secretPath(secretDir, ns). */
  secretDir?: string;
  adminSecret?: string;
  adminSecretFile?: string;
}

function envValue(env: NodeJS.ProcessEnv, name: string): string | undefined {
  const v = env[name];
  return v === undefined || v === '' ? undefined : v;
}

/**
 * Finds secrets for a client. Explicit options win over the environment and a value
 * wins over a file. Files are read on every call so a rotated secret is picked up
 * at the next connection.
 */
export class SecretSource {
  private readonly opts: SecretOptions;

  constructor(opts: SecretOptions = {}, env: NodeJS.ProcessEnv = process.env) {
    this.opts = {
      secret: opts.secret ?? (opts.secretFile === undefined ? envValue(env, 'DYAD_SECRET') : undefined),
      secretFile: opts.secretFile ?? envValue(env, 'DYAD_SECRET_FILE'),
      secretDir: opts.secretDir,
      adminSecret: opts.adminSecret ?? (opts.adminSecretFile === undefined ? envValue(env, 'DYAD_ADMIN_SECRET') : undefined),
      adminSecretFile: opts.adminSecretFile ?? envValue(env, 'DYAD_ADMIN_SECRET_FILE'),
    };
    // Fail at construction on a malformed value rather than at the first request.
    if (this.opts.secret !== undefined) this.opts.secret = parseSecret(this.opts.secret, opts.secret !== undefined ? 'the secret option' : 'DYAD_SECRET');
    if (this.opts.adminSecret !== undefined) {
      this.opts.adminSecret = parseSecret(this.opts.adminSecret, opts.adminSecret !== undefined ? 'the adminSecret option' : 'DYAD_ADMIN_SECRET');
    }
  }

  /** An explicitly configured namespace secret value (used when creating a namespace). */
  get explicitSecret(): string | undefined {
    return this.opts.secret;
  }

  hasAdmin(): boolean {
    return this.opts.adminSecret !== undefined || this.opts.adminSecretFile !== undefined;
  }

  async adminSecret(): Promise<string | undefined> {
    if (this.opts.adminSecret !== undefined) return this.opts.adminSecret;
    if (this.opts.adminSecretFile !== undefined) return readSecretFile(this.opts.adminSecretFile);
    return undefined;
  }

  async namespaceSecret(ns: string): Promise<string | undefined> {
    if (this.opts.secret !== undefined) return this.opts.secret;
    if (this.opts.secretFile !== undefined) return readSecretFile(this.opts.secretFile);
    if (this.opts.secretDir !== undefined) return readSecretFile(secretPath(this.opts.secretDir, ns));
    return undefined;
  }
}
