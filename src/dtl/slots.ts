/**
 * A counting semaphore for transfers: at most `max` holders, the rest wait
 * in arrival order. A waiter whose AbortSignal fires leaves the queue and
 * rejects with the signal's reason (the caller turns that into its error).
 */
export class Slots {
  private used = 0;
  private readonly waiters: { grant: () => void }[] = [];
  constructor(private readonly max: number) {}

  /** Nobody holds or waits for a slot. */
  get idle(): boolean {
    return this.used === 0 && this.waiters.length === 0;
  }

  acquire(signal?: AbortSignal): Promise<void> {
    if (this.used < this.max) {
      this.used++;
      return Promise.resolve();
    }
    return new Promise<void>((resolve, reject) => {
      const w = {
        grant: () => {
          signal?.removeEventListener('abort', onAbort);
          resolve();
        },
      };
      const onAbort = (): void => {
        const i = this.waiters.indexOf(w);
        if (i >= 0) this.waiters.splice(i, 1);
        reject(signal!.reason);
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.waiters.push(w);
    });
  }

  /** Hands the slot to the next waiter, or frees it. */
  release(): void {
    const w = this.waiters.shift();
    if (w) w.grant();
    else this.used--;
  }
}
