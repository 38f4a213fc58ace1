/**
 * Node ids handed to the kernel, with the lookup count the kernel holds on
 * each. Every reply that carries an entry (LOOKUP, CREATE, MKDIR, ...,
 * READDIRPLUS) adds one; FORGET takes them back, and at zero the node is
 * gone and its id is never reused while the kernel could still name it.
 */
import { FUSE_ROOT_ID } from './abi.js';

interface Slot<T> {
  data: T;
  nlookup: number;
}

export class InodeTable<T> {
  private readonly slots = new Map<number, Slot<T>>();
  private nextId = FUSE_ROOT_ID + 1;

  constructor(root: T) {
    // The root is never forgotten.
    this.slots.set(FUSE_ROOT_ID, { data: root, nlookup: Number.POSITIVE_INFINITY });
  }

  /** Allocates a fresh id for data, with no lookups counted yet. */
  add(data: T): number {
    const id = this.nextId++;
    this.slots.set(id, { data, nlookup: 0 });
    return id;
  }

  get(nodeid: number): T | undefined {
    return this.slots.get(nodeid)?.data;
  }

  /** Counts one more kernel reference (call once per entry sent). */
  ref(nodeid: number): void {
    const s = this.slots.get(nodeid);
    if (s) s.nlookup++;
  }

  /** Drops kernel references; returns the data when the node is gone. */
  forget(nodeid: number, n: number): T | undefined {
    const s = this.slots.get(nodeid);
    if (!s) return undefined;
    s.nlookup -= n;
    if (s.nlookup > 0) return undefined;
    this.slots.delete(nodeid);
    return s.data;
  }

  /** Drops a node the kernel never learned about (its entry reply failed). */
  discard(nodeid: number): void {
    const s = this.slots.get(nodeid);
    if (s && s.nlookup <= 0) this.slots.delete(nodeid);
  }

  get size(): number {
    return this.slots.size;
  }
}
