/**
 * The copies a node keeps of other nodes' files, and their eviction when
 * they outgrow DYAD_CACHE_CAPACITY (DYAD's cache eviction, made safe).
 *
 * What counts: files pulled from another owner (or landed with their
 * publication), and files copied from the origin (--origin), which this
 * node publishes as their owner but the origin still has. A file written
 * here is never evicted: it may be the only copy anywhere, and DYAD, which
 * evicts those too, leaves readers elsewhere failing on a record whose file
 * is gone. An evicted copy comes back at its next open, by a pull or from
 * the origin.
 *
 * When the copies pass the capacity, the least recently opened (LRU) or the
 * first landed (FIFO) go first, down to the low watermark. A copy opened
 * within the grace period, or open now, stays; so does one whose pull is
 * under way. The caller decides what "open now" means (evict() says no).
 */

export type CachePolicyName = 'LRU' | 'FIFO' | 'NONE';

export interface CacheSettings {
  /** Bytes of copies kept before evicting; 0: never evict. */
  capacityBytes: number;
  policy: CachePolicyName;
  /** Evict down to this fraction of the capacity. */
  lowWatermark: number;
  /** A copy opened this recently (ms) is not evicted. */
  graceMs: number;
}

/** Do these settings ever evict? */
export function evicts(s: CacheSettings): boolean {
  return s.capacityBytes > 0 && s.policy !== 'NONE';
}

interface Copy<R> {
  rec: R;
  size: number;
  landedMs: number;
  usedMs: number;
}

/** `R`: what the owner of the cache keeps per copy (its record), handed back at eviction. */
export class CopyCache<R> {
  private readonly copies = new Map<string, Copy<R>>();
  private bytes = 0;

  constructor(
    private readonly s: CacheSettings,
    /**
     * Removes one copy: 'evicted'; 'busy' when it is in use and must stay;
     * 'not-a-copy' when it turned out to be the only one left (no longer counted).
     */
    private readonly evict: (upath: string, rec: R) => 'evicted' | 'busy' | 'not-a-copy',
    private readonly now: () => number = Date.now,
  ) {}

  /** Does this cache ever evict? Without it nothing needs tracking. */
  get enabled(): boolean {
    return evicts(this.s);
  }

  get usedBytes(): number {
    return this.bytes;
  }

  has(upath: string): boolean {
    return this.copies.has(upath);
  }

  /** A copy landed (or, after a restart, was found) in storage. */
  add(upath: string, size: number, rec: R, landedMs = this.now(), usedMs = landedMs): void {
    if (!this.enabled) return;
    this.remove(upath);
    this.copies.set(upath, { rec, size, landedMs, usedMs });
    this.bytes += size;
  }

  /** A copy was opened. */
  touch(upath: string): void {
    const c = this.copies.get(upath);
    if (c) c.usedMs = this.now();
  }

  /** No longer a copy to account for (removed, renamed, written here): what was kept of it, if it was one. */
  remove(upath: string): R | undefined {
    const c = this.copies.get(upath);
    if (!c) return undefined;
    this.copies.delete(upath);
    this.bytes -= c.size;
    return c.rec;
  }

  /** Copies under a directory that went away or moved (their paths changed). */
  removeUnder(dir: string): Array<[string, R]> {
    if (this.copies.size === 0) return [];
    const prefix = `${dir}/`;
    const gone = [...this.copies].filter(([p]) => p.startsWith(prefix));
    for (const [p] of gone) this.remove(p);
    return gone.map(([p, c]) => [p, c.rec]);
  }

  /**
   * Evicts while the copies exceed the capacity, down to the low watermark.
   * `keep`: copies not to touch this time (pulls under way). Returns what
   * was evicted.
   */
  trim(keep: (upath: string) => boolean = () => false): string[] {
    if (!this.enabled || this.bytes <= this.s.capacityBytes) return [];
    const target = this.s.capacityBytes * this.s.lowWatermark;
    const now = this.now();
    const order = [...this.copies].sort(([, a], [, b]) => (this.s.policy === 'FIFO' ? a.landedMs - b.landedMs : a.usedMs - b.usedMs));
    const evicted: string[] = [];
    for (const [upath, c] of order) {
      if (this.bytes <= target) break;
      if (now - c.usedMs < this.s.graceMs || keep(upath)) continue;
      const done = this.evict(upath, c.rec);
      if (done === 'busy') continue;
      this.remove(upath);
      if (done === 'evicted') evicted.push(upath);
    }
    return evicted;
  }
}
