/**
 * What a storage file is, as a mark that outlives the daemon: an extended
 * attribute, `user.dyad.state`, on the storage file.
 *
 * - "writing": a program on the mount opened the file for writing and has
 *   not closed it normally yet. A restarted daemon publishes what its
 *   storage holds, and without the mark it cannot tell a complete file from
 *   one whose writer was killed (SIGKILL, the OOM killer, a job's time
 *   limit) or was cut off when the previous daemon died: it would hand
 *   readers elsewhere a torn copy as if complete. Marked files stay
 *   unpublished, on their node only.
 * - "origin": a copy of the origin's file (--origin), which the node may
 *   evict as it evicts pulled copies (cache.ts): the origin still has it.
 *   A write through the mount turns the mark to "writing", and the normal
 *   close that follows removes it: the file is then this node's own, never
 *   evicted.
 * - no mark: a file of this node's own (or a pulled copy, known by its record).
 *
 * The attribute follows the file through renames and goes with it, and the
 * mount never shows it (extended attributes are not served). A storage
 * without user extended attributes (ENOTSUP) gets no marks: a restart there
 * publishes every file, and origin copies found by one are kept as own.
 */
import { native } from '../fuse/native.js';
import { errnos } from '../errors.js';

export const STATE_XATTR = 'user.dyad.state';

export type StorageMark = 'writing' | 'origin';

const VALUES: Record<StorageMark, Buffer> = { writing: Buffer.from('writing'), origin: Buffer.from('origin') };

export class StorageMarks {
  /** False once the storage has refused a mark: no more are tried. */
  private supported = true;

  constructor(private readonly onUnsupported: (errno: number) => void) {}

  /** Marks the file behind `fd`, or at a storage path. */
  set(target: number | string, mark: StorageMark): void {
    if (!this.supported) return;
    const rc = typeof target === 'number' ? native.fsetxattr(target, STATE_XATTR, VALUES[mark]) : native.lsetxattr(target, STATE_XATTR, VALUES[mark]);
    if (rc < 0) this.refused(-rc);
  }

  /** The file is this node's own, complete. `target`: a descriptor of it, or its path. */
  clear(target: number | string): void {
    if (!this.supported) return;
    const rc = native.removexattr(target, STATE_XATTR);
    // ENODATA: never marked (written while marks were unavailable, or by a
    // program beside the mount); ENOENT: removed meanwhile.
    if (rc < 0 && -rc !== errnos.ENODATA && -rc !== errnos.ENOENT) this.refused(-rc);
  }

  /** The mark of the file at a storage path, if any. */
  get(path: string): StorageMark | undefined {
    const v = native.lgetxattr(path, STATE_XATTR);
    return v === 'writing' || v === 'origin' ? v : undefined;
  }

  private refused(errno: number): void {
    // Only a storage without user xattrs stops the marks; a passing error
    // on one file (EIO, ENOSPC for the attribute) must not turn them off.
    if (errno !== errnos.ENOTSUP && errno !== errnos.EOPNOTSUPP) return;
    this.supported = false;
    this.onUnsupported(errno);
  }
}
