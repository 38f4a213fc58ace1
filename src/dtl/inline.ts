/**
 * When to do file I/O on the event loop instead of the thread pool.
 *
 * At GB/s a thread-pool hop per 1 MiB chunk is not the cost; the cache is:
 * a buffer filled on the event loop's core and then read by a pool thread on
 * the other core is fetched again from memory. Measured on the project VM
 * (2 vCPUs, 16 x 64 MiB pulls), writing received buffers inline costs the
 * consumer ~0.65 CPU-s per GiB against ~1.05 through the pool.
 *
 * The risk of inline I/O is a stalled event loop (which also serves FUSE
 * requests) when the disk is slow: dirty-page throttling, a cold read. So
 * the 'adaptive' mode goes inline only while operations are fast, and after
 * any inline operation slower than `slowMs` uses the pool for `backoffMs`:
 * at most one stall of that kind per back-off period.
 */
export type IoMode = 'adaptive' | 'inline' | 'pool';

export class InlinePolicy {
  private poolUntil = 0;
  constructor(
    private readonly slowMs: number,
    private readonly backoffMs: number,
  ) {}

  /** Returns a start time to pass to done() when the call should be inline, or -1. */
  begin(mode: IoMode): number {
    if (mode === 'pool') return -1;
    const now = performance.now();
    return mode === 'inline' || now >= this.poolUntil ? now : -1;
  }

  done(start: number): void {
    const now = performance.now();
    if (now - start > this.slowMs) this.poolUntil = now + this.backoffMs;
  }
}

// Process-wide, because slowness is a property of the disk, not of a transfer.
export const inlineWrites = new InlinePolicy(4, 2000);
export const inlineReads = new InlinePolicy(4, 2000);
