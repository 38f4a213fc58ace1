/**
 * A namespace's change events on their way to the sessions watching it,
 * gathered while publications come in bursts.
 *
 * Every event frame costs a socket write here and, on every watcher, a
 * wake-up, a read and a JSON parse. A producer closing a thousand small files
 * a second paid that once per file, on the two CPUs its own next request
 * needed. So an event after a quiet spell (nothing sent for `holdMs`) still
 * leaves at once, and events that follow within `holdMs` of a send are held
 * and leave together, in one frame per watcher, `holdMs` after it. A watcher
 * learns of a change at most `holdMs` later than before; a burst costs one
 * frame per `holdMs` instead of one per file.
 *
 * Held events leave before any reply of the server (flush()), so a watcher
 * still sees every change before the reply to a request sent after it, as
 * WatchableKvs promises.
 */
import { encodeFrame, type EventFrame, type WireChange } from './protocol.js';
import type { KvsChange } from '../types.js';

/** Anything an event frame can be sent to (a Session). */
export interface Watcher {
  send(frame: Buffer): void;
}

/**
 * How long after a send further events are held (ms). Measured on the
 * project VM, a producer closing 4 KiB files back to back: 1 ms held about
 * 3 events a frame and left the watching daemon 120-130 µs of CPU per
 * publication; 5 ms holds about 15 and leaves it about 100 µs, and the
 * producer's close() was 50-80 µs quicker over the first 2000 files. Waits
 * are not delayed by it (their replies flush what is held).
 */
export const DEFAULT_HOLD_MS = 5;
/** Held events leave early once their pushed bytes reach this much (frames stay far below the client's limit). */
const MAX_HELD_BYTES = 1 << 20;

interface Held {
  change: KvsChange;
  /** The session that made the change: its copy leaves out the bytes it pushed itself. */
  origin: Watcher | undefined;
}

export class Fanout {
  readonly watchers = new Set<Watcher>();
  private held: Held[] = [];
  private heldBytes = 0;
  private heldRev = 0;
  private lastSent = -Infinity;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly ns: string,
    private readonly holdMs = DEFAULT_HOLD_MS,
  ) {}

  get pending(): boolean {
    return this.held.length > 0;
  }

  change(rev: number, changes: KvsChange[], origin: Watcher | undefined): void {
    for (const change of changes) {
      this.held.push({ change, origin });
      this.heldBytes += change.content?.byteLength ?? 0;
    }
    this.heldRev = rev;
    if (this.timer !== undefined && this.heldBytes < MAX_HELD_BYTES) return;
    const wait = this.lastSent + this.holdMs - performance.now();
    if (wait <= 0 || this.heldBytes >= MAX_HELD_BYTES) return this.flush();
    this.timer = setTimeout(this.flushLater, wait);
  }

  /** Sends what is held now. */
  flush(): void {
    if (this.timer !== undefined) {
      clearTimeout(this.timer);
      this.timer = undefined;
    }
    if (this.held.length === 0) return;
    const held = this.held;
    this.held = [];
    this.heldBytes = 0;
    this.lastSent = performance.now();
    const shared = this.frame(held, undefined);
    const origins = new Set<Watcher>();
    for (const h of held) if (h.origin !== undefined && h.change.content !== undefined) origins.add(h.origin);
    for (const w of this.watchers) w.send(origins.has(w) ? this.frame(held, w) : shared);
  }

  /** Drops what is held (the namespace is closing) and stops the timer. */
  stop(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    this.held = [];
    this.heldBytes = 0;
  }

  private readonly flushLater = (): void => {
    this.timer = undefined;
    this.flush();
  };

  private frame(held: Held[], to: Watcher | undefined): Buffer {
    const bytes: Uint8Array[] = [];
    let at = 0;
    const changes: WireChange[] = held.map(({ change: c, origin }) => {
      if (c.content === undefined || (to !== undefined && origin === to)) return { path: c.upath, rec: c.record ?? null };
      bytes.push(c.content);
      at += c.content.byteLength;
      return { path: c.upath, rec: c.record ?? null, bin: [at - c.content.byteLength, c.content.byteLength] };
    });
    return encodeFrame({ ev: 'change', ns: this.ns, rev: this.heldRev, changes } satisfies EventFrame, bytes);
  }
}
