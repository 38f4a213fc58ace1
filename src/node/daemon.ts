/**
 * The per-node daemon: opens the storage, builds the file system for it,
 * mounts it and keeps it served until told to stop or unmounted.
 */
import fs from 'node:fs';
import path from 'node:path';
import { FuseServer } from '../fuse/server.js';
import { requestChannel } from '../fuse/session.js';
import { MirrorFs } from '../dmd/mirror.js';
import { Storage } from '../dmd/storage.js';
import { ConfigError, DyadError, errnos } from '../errors.js';
import { Logger } from './log.js';

export interface DaemonOptions {
  mountpoint: string;
  /** Storage directory; defaults to the mountpoint's own directory. */
  storage?: string;
  /** 'auto' uses kernel passthrough when the kernel offers it and we are root. */
  passthrough: 'auto' | 'off';
  ttlMs: number;
  spinUs: number;
  logger: Logger;
}

export function validateMountpoint(mountpoint: string): string {
  const mp = path.resolve(mountpoint);
  let st: fs.Stats;
  try {
    st = fs.statSync(mp);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOTCONN') return mp; // a dead mount of a killed daemon: cleared at start
    if (code === 'ENOENT') throw new ConfigError(`${mp}: no such directory`, errnos.ENOENT);
    if (code === 'EACCES') throw new ConfigError(`${mp}: permission denied`, errnos.EACCES);
    throw err;
  }
  if (!st.isDirectory()) throw new ConfigError(`${mp}: not a directory`, errnos.ENOTDIR);
  if (!fs.existsSync('/dev/fuse')) {
    throw new ConfigError('/dev/fuse is missing: this kernel or container has no FUSE', errnos.ENODEV);
  }
  return mp;
}

export class Daemon {
  private server?: FuseServer;
  private storage?: Storage;
  fs?: MirrorFs;
  readonly mountpoint: string;

  constructor(private readonly opts: DaemonOptions) {
    this.mountpoint = validateMountpoint(opts.mountpoint);
  }

  async start(): Promise<void> {
    const log = this.opts.logger;
    const storageDir = path.resolve(this.opts.storage ?? this.mountpoint);
    if (this.opts.storage && !fs.statSync(storageDir, { throwIfNoEntry: false })?.isDirectory()) {
      throw new ConfigError(`--storage ${storageDir}: not a directory`, errnos.ENOTDIR);
    }
    // Open the storage before mounting: when it is the mountpoint itself,
    // this fd is the only way left to reach it.
    const { clearStaleMount } = await import('../fuse/mount.js');
    if (clearStaleMount(this.mountpoint)) log.warn(`cleared a stale mount at ${this.mountpoint} (its daemon had died)`);
    this.storage = Storage.open(storageDir);
    const isRoot = process.getuid?.() === 0;
    const wantPassthrough = this.opts.passthrough === 'auto' && isRoot;
    const fsys = new MirrorFs(this.storage, { passthrough: wantPassthrough, ttlMs: this.opts.ttlMs });
    this.fs = fsys;
    const server = new FuseServer(this.mountpoint, fsys, { passthrough: wantPassthrough, spinUs: this.opts.spinUs });
    this.server = server;
    server.on('warning', (err: Error) => log.warn(err.message));
    if (log.enabled('debug')) {
      requestChannel.subscribe((m) => {
        const r = m as { op: string; nodeid: number; pid: number };
        log.debug(`${r.op} node=${r.nodeid} pid=${r.pid}`);
      });
    }
    const info = await server.start((s) => fsys.attach(s));
    const reason = fsys.passthroughActive
      ? 'on'
      : this.opts.passthrough === 'off'
        ? 'off (--passthrough off)'
        : !isRoot
          ? 'off (needs CAP_SYS_ADMIN; the daemon serves reads and writes)'
          : 'off (the kernel did not offer it; the daemon serves reads and writes)';
    log.info(`serving ${this.mountpoint} from ${storageDir} (FUSE 7.${info.minor}, passthrough ${reason})`);
  }

  /** Request counts by opcode since start. */
  stats(): Record<string, number> {
    return this.server?.session?.stats() ?? {};
  }

  onUnmounted(cb: () => void): void {
    if (!this.server) throw new DyadError('DYAD_ESTATE', errnos.EINVAL, 'daemon not started');
    this.server.on('unmounted', cb);
  }

  async stop(): Promise<void> {
    await this.server?.stop();
    this.storage?.close();
  }
}
