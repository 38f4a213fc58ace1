/**
 * Positional reads and writes on the thread pool, as Promises: the file
 * servers, the digest of a large file and the origin copy all read (or
 * write) a file in chunks at known offsets. And the one synchronous write
 * the sinks use for buffers that land at memory speed.
 */
import { read as fsRead, write as fsWrite, writeSync } from 'node:fs';

/** Reads up to `len` bytes at `pos` into the start of `buf`; resolves with the count (0 at end of file). */
export function readAt(fd: number, buf: Buffer, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fsRead(fd, buf, 0, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}

/** Writes the first `len` bytes of `buf` at `pos`, all of them. */
export function writeAt(fd: number, buf: Buffer, len: number, pos: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (off: number): void => {
      fsWrite(fd, buf, off, len - off, pos + off, (err, n) => {
        if (err) return reject(err);
        if (off + n < len) return step(off + n);
        resolve();
      });
    };
    step(0);
  });
}

/** Writes all of `buf` at `pos`, on this thread. */
export function writeAllSync(fd: number, buf: Uint8Array, pos: number): void {
  for (let off = 0; off < buf.byteLength; ) off += writeSync(fd, buf, off, buf.byteLength - off, pos + off);
}
