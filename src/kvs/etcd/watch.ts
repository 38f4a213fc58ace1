/**
 * One etcd watch stream per client, multiplexing a watcher per namespace
 * prefix, that resumes after any stream loss from exactly the next revision its
 * targets have not yet been given, so nothing is lost or repeated across an
 * etcd restart or a member failover.
 *
 * We do not use etcd3's Watcher for this: it moves its resume point to the
 * header revision of each create response and of each event batch, which is
 * the store's current revision, not the last delivered event. A stream that
 * breaks again before the catch-up events arrive, or an unsynced watcher whose
 * history is sent in several batches, would then skip events for good.
 *
 * Targets see each revision's events together (etcd never splits one
 * revision across responses, and fragments are reassembled here), in order.
 */
import type { Etcd3, IDuplexStream, IEvent, IWatchRequest, IWatchResponse } from 'etcd3';

export interface WatchTarget {
  readonly key: Buffer;
  readonly end: Buffer;
  /** The next revision the target wants; the hub advances it and resumes from it. */
  nextRev: number;
  /** The watcher exists on the server: from now on every change from nextRev will arrive. */
  onCreated(): void;
  /** Every event of one revision, in key order. nextRev is already past it. */
  onRevision(rev: number, events: IEvent[]): void;
  /** nextRev moved on without events (a progress notification). */
  onProgress(): void;
  /** History from nextRev is gone; the hub resumes from compactRev. */
  onCompacted(compactRev: number): void;
  /** etcd cancelled the watch for a reason other than compaction; the target is dropped. */
  onCancelled(reason: string): void;
}

export interface WatchHubOptions {
  reconnectMinMs: number;
  reconnectMaxMs: number;
  /** Told about each stream loss (for diagnostics). */
  onStreamError?: (err: unknown) => void;
}

type Stream = IDuplexStream<IWatchRequest, IWatchResponse>;

interface Slot {
  target: WatchTarget;
  id: string | undefined;
  /** Events of a fragmented response, until its last fragment. */
  frags: IEvent[];
}

export class WatchHub {
  private stream: Stream | undefined;
  private connecting = false;
  private readonly slots = new Map<WatchTarget, Slot>();
  private readonly byId = new Map<string, Slot>();
  private queue: Slot[] = [];
  /** The slot whose create request awaits its response; creates go one at a time so responses match. */
  private creating: Slot | undefined;
  private delay: number;
  private timer: NodeJS.Timeout | undefined;
  private closed = false;

  constructor(
    private readonly client: Etcd3,
    private readonly opts: WatchHubOptions,
  ) {
    this.delay = opts.reconnectMinMs;
  }

  add(target: WatchTarget): void {
    if (this.closed || this.slots.has(target)) return;
    const slot: Slot = { target, id: undefined, frags: [] };
    this.slots.set(target, slot);
    this.queue.push(slot);
    this.pump();
  }

  remove(target: WatchTarget): void {
    const slot = this.slots.get(target);
    if (slot === undefined) return;
    this.slots.delete(target);
    this.queue = this.queue.filter((s) => s !== slot);
    if (slot.id !== undefined) {
      this.byId.delete(slot.id);
      this.write({ cancel_request: { watch_id: slot.id } });
    }
    // A slot still being created is cancelled when its create response arrives.
    if (this.slots.size === 0 && this.creating === undefined) this.dropStream();
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.timer);
    this.slots.clear();
    this.byId.clear();
    this.queue = [];
    this.dropStream();
  }

  private write(req: IWatchRequest): void {
    try {
      this.stream?.write(req);
    } catch (err) {
      // A write racing the stream's failure; the loss handler resumes everything.
      this.lost(this.stream, err);
    }
  }

  private dropStream(): void {
    const s = this.stream;
    this.stream = undefined;
    this.creating = undefined;
    this.byId.clear();
    if (s !== undefined) {
      try {
        s.cancel();
      } catch {
        // already gone
      }
    }
  }

  private pump(): void {
    if (this.closed || this.creating !== undefined || this.queue.length === 0) return;
    if (this.stream === undefined) {
      this.connect();
      return;
    }
    const slot = this.queue.shift()!;
    this.creating = slot;
    const t = slot.target;
    this.write({
      create_request: { key: t.key, range_end: t.end, start_revision: t.nextRev, progress_notify: true, fragment: true },
    });
  }

  private connect(): void {
    if (this.connecting || this.timer !== undefined || this.closed) return;
    this.connecting = true;
    this.client.watchClient.watch().then(
      (stream) => {
        this.connecting = false;
        if (this.closed || this.slots.size === 0) {
          stream.cancel();
          return;
        }
        this.stream = stream;
        stream.on('data', (res) => this.onData(stream, res));
        stream.on('error', (err) => this.lost(stream, err));
        stream.on('end', () => this.lost(stream, new Error('etcd ended the watch stream')));
        this.creating = undefined;
        this.queue = [...this.slots.values()];
        this.pump();
      },
      (err: unknown) => {
        this.connecting = false;
        this.lost(undefined, err);
      },
    );
  }

  private lost(stream: Stream | undefined, err: unknown): void {
    if (stream !== undefined && stream !== this.stream) return;
    this.stream = undefined;
    this.creating = undefined;
    this.byId.clear();
    for (const slot of this.slots.values()) {
      slot.id = undefined;
      slot.frags = [];
    }
    this.queue = [];
    if (this.closed || this.slots.size === 0) return;
    this.opts.onStreamError?.(err);
    const wait = this.delay * (0.5 + Math.random());
    this.delay = Math.min(this.delay * 2, this.opts.reconnectMaxMs);
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.connect();
    }, wait);
  }

  private onData(stream: Stream, res: IWatchResponse): void {
    if (stream !== this.stream) return;
    if (res.created) {
      const slot = this.creating;
      this.creating = undefined;
      if (slot !== undefined && this.slots.get(slot.target) === slot) {
        this.delay = this.opts.reconnectMinMs;
        if (res.canceled) {
          this.cancelled(slot, res);
        } else {
          slot.id = res.watch_id;
          this.byId.set(res.watch_id, slot);
          slot.target.onCreated();
        }
      } else if (!res.canceled) {
        this.write({ cancel_request: { watch_id: res.watch_id } });
      }
      if (this.slots.size === 0) this.dropStream();
      else this.pump();
      return;
    }
    const slot = this.byId.get(res.watch_id);
    if (slot === undefined) return;
    if (res.canceled) {
      this.byId.delete(res.watch_id);
      slot.id = undefined;
      this.cancelled(slot, res);
      return;
    }
    if (res.fragment) {
      for (const ev of res.events) slot.frags.push(ev);
      return;
    }
    let events = res.events;
    if (slot.frags.length > 0) {
      events = slot.frags.concat(events);
      slot.frags = [];
    }
    const t = slot.target;
    if (events.length === 0) {
      // Progress notifications are sent only to watchers that have caught up.
      const rev = Number(res.header.revision);
      if (rev + 1 > t.nextRev) {
        t.nextRev = rev + 1;
        t.onProgress();
      }
      return;
    }
    let i = 0;
    while (i < events.length) {
      const rev = Number(events[i]!.kv.mod_revision);
      let j = i + 1;
      while (j < events.length && Number(events[j]!.kv.mod_revision) === rev) j++;
      if (rev >= t.nextRev) {
        t.nextRev = rev + 1;
        t.onRevision(rev, events.slice(i, j));
        if (this.slots.get(t) !== slot) return;
      }
      i = j;
    }
  }

  private cancelled(slot: Slot, res: IWatchResponse): void {
    const compactRev = Number(res.compact_revision);
    if (compactRev > 0) {
      slot.target.onCompacted(compactRev);
      if (this.slots.get(slot.target) !== slot) return;
      slot.target.nextRev = Math.max(slot.target.nextRev, compactRev);
      this.queue.push(slot);
      this.pump();
      return;
    }
    this.slots.delete(slot.target);
    slot.target.onCancelled(res.cancel_reason || 'cancelled by etcd');
  }
}
