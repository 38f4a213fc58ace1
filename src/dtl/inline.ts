/**
 * When to do bulk file I/O on the event loop instead of the thread pool.
 *
 * At GB/s a thread-pool hop per 1 MiB chunk is not the cost; the cache is:
 * a buffer filled on the event loop's core and then read by a pool thread on
 * the other core is fetched again from memory. Measured on the project VM
 * (2 vCPUs, 16 x 64 MiB pulls, quiet machine), writing received buffers
 * inline cost the consumer ~0.65 CPU-s per GiB against ~1.05 via the pool.
 *
 * But inline I/O is serial with the socket reads and the digest, and it can
 * stall the event loop (which also serves FUSE requests). On the same VM,
 * fresh page-cache pages are often slow to fill (the balloon's free page
 * reporting makes first touches cost host faults): a 1 MiB write then takes
 * 1-3 ms, and the thread pool, running beside the event loop, wins.
 *
 * So 'adaptive' goes inline only while operations run at memory speed
 * (>= MIN_INLINE_RATE, and never slower than `slowMs` in absolute terms);
 * after a slower one it uses the pool for `backoffMs`, then tries again.
 */
export type IoMode = 'adaptive' | 'inline' | 'pool';

/** Bytes per millisecond (2 GB/s) an inline operation must reach to stay inline. */
const MIN_INLINE_RATE = 2e6;

export class InlinePolicy {
  private poolUntil = 0;
  constructor(
    private readonly slowMs: number,
    private readonly backoffMs: number,
  ) {}

  /** A start time to hand to done() if the operation should run inline, else -1. */
  begin(mode: IoMode): number {
    if (mode === 'pool') return -1;
    const now = performance.now();
    return mode === 'inline' || now >= this.poolUntil ? now : -1;
  }

  done(start: number, bytes: number): void {
    const now = performance.now();
    const took = now - start;
    if (took > this.slowMs || took > 0.2 + bytes / MIN_INLINE_RATE) this.poolUntil = now + this.backoffMs;
  }
}

// Process-wide, because slowness is a property of the disk and memory, not of a transfer.
export const inlineWrites = new InlinePolicy(4, 2000);
export const inlineReads = new InlinePolicy(4, 2000);
