/**
 * Which storage files a writer never finished, as a mark that outlives the
 * daemon: an extended attribute set on a file when a program on the mount
 * opens it for writing, and removed when its last writer closes it normally.
 *
 * A restarted daemon publishes what its storage holds, and without the mark
 * it cannot tell a complete file from one whose writer was killed (SIGKILL,
 * the OOM killer, a job's time limit) or was cut off when the previous
 * daemon died: it would hand readers elsewhere a torn copy as if complete,
 * the failure DYAD has when its node restarts. With the mark such a file
 * stays unpublished, seen on its own node only, and the daemon says which.
 *
 * The attribute lives on the storage file, so it follows the file through
 * renames and goes with it, and the mount never shows it (extended
 * attributes are not served). A storage without user extended attributes
 * (ENOTSUP) gets no marks: a restart there publishes every file, as before.
 */
import { native } from '../fuse/native.js';
import { errnos } from '../errors.js';

export const UNFINISHED_XATTR = 'user.dyad.writing';

const ONE = Buffer.from('1');

export class UnfinishedMarks {
  /** False once the storage has refused a mark: no more are tried. */
  private supported = true;

  constructor(private readonly onUnsupported: (errno: number) => void) {}

  get available(): boolean {
    return this.supported;
  }

  /** A program on the mount opened the file behind `fd` for writing. */
  mark(fd: number): void {
    if (!this.supported) return;
    const rc = native.fsetxattr(fd, UNFINISHED_XATTR, ONE);
    if (rc < 0) this.refused(-rc);
  }

  /** Its last writer closed it normally: it is complete. `target`: a descriptor of it, or its path. */
  clear(target: number | string): void {
    if (!this.supported) return;
    const rc = native.removexattr(target, UNFINISHED_XATTR);
    // ENODATA: never marked (written while marks were unavailable, or by a
    // program beside the mount); ENOENT: removed meanwhile.
    if (rc < 0 && -rc !== errnos.ENODATA && -rc !== errnos.ENOENT) this.refused(-rc);
  }

  /** Does the file at `path` carry the mark? */
  has(path: string): boolean {
    return native.getxattrSize(path, UNFINISHED_XATTR) >= 0;
  }

  private refused(errno: number): void {
    // Only a storage without user xattrs stops the marks; a passing error
    // on one file (EIO, ENOSPC for the attribute) must not turn them off.
    if (errno !== errnos.ENOTSUP && errno !== errnos.EOPNOTSUPP) return;
    this.supported = false;
    this.onUnsupported(errno);
  }
}
