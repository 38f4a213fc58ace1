/**
 * A mounted file system: mount, serve, unmount, as one object.
 *
 * The mount is made before the session starts, and start() resolves only
 * after the kernel's INIT is answered, so callers (and --background) know
 * the mount is usable when it returns.
 */
import { EventEmitter } from 'node:events';
import { FuseSession, type NegotiatedInit, type SessionOptions } from './session.js';
import { clearStaleMount, mount, unmount, type MountOptions, type Mounted } from './mount.js';
import { native } from './native.js';
import type { FileSystem } from './types.js';

export interface ServeOptions extends SessionOptions, MountOptions {}

export class FuseServer extends EventEmitter {
  private mounted?: Mounted;
  session?: FuseSession;
  private stopping = false;

  constructor(readonly mountpoint: string, private readonly fs: FileSystem, private readonly opts: ServeOptions = {}) {
    super();
  }

  /** True if a dead mount had to be cleared first. */
  staleCleared = false;

  async start(onSession?: (s: FuseSession) => void): Promise<NegotiatedInit> {
    this.staleCleared = clearStaleMount(this.mountpoint);
    this.mounted = mount(this.mountpoint, { ...this.opts, defaultPermissions: !this.fs.checksPermissions });
    const session = new FuseSession(this.mounted.fd, this.fs, this.opts);
    this.session = session;
    onSession?.(session);
    session.on('warning', (err: Error) => this.emit('warning', err));
    session.on('closed', (errno: number) => {
      // The kernel side went away: someone ran umount, or the connection was aborted.
      if (!this.stopping) this.emit('unmounted', errno);
    });
    return session.start();
  }

  /** Unmounts (lazily if busy) and stops serving. */
  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    if (this.mounted) {
      try {
        unmount(this.mountpoint);
      } catch (err) {
        const code = (err as { code?: string }).code;
        // Already unmounted by someone else: nothing left to do.
        if (code === 'DYAD_ENOTMOUNTED') return this.finish();
        // Busy is expected when stopping under load: detaching it is the plan, no news.
        if (code !== 'DYAD_EBUSY') this.emit('warning', err as Error);
        try {
          unmount(this.mountpoint, { lazy: true });
        } catch {
          /* already gone */
        }
      }
    }
    this.finish();
  }

  private finish(): void {
    this.session?.close();
    if (this.mounted) native.closeFd(this.mounted.fd);
    this.mounted = undefined;
  }
}
