/**
 * A free list of equal-sized transfer buffers. Allocating a fresh 1 MiB
 * Buffer per chunk costs an mmap and 256 page faults each time, which shows
 * at GB/s rates; recycling keeps the pages warm. Buffers not given back
 * (a socket destroyed mid-write) are simply left to the GC.
 */
export class BufferPool {
  private readonly free: Buffer[] = [];
  constructor(
    readonly size: number,
    private readonly maxIdle: number,
  ) {}

  take(): Buffer {
    return this.free.pop() ?? Buffer.allocUnsafeSlow(this.size);
  }

  give(buf: Buffer): void {
    if (buf.length === this.size && this.free.length < this.maxIdle) this.free.push(buf);
  }
}
