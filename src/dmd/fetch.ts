/**
 * Bringing a published file into local storage: wait for its record, then
 * pull it from the owner unless the owner shares this node's storage.
 *
 * One fetch per upath at a time however many readers ask (single flight);
 * each reader can give up on its own (signal, timeout) and the shared work
 * is cancelled only when no reader is left.
 */
import fs from 'node:fs';
import path from 'node:path';
import diagnostics from 'node:diagnostics_channel';
import type { FileRecord, Kvs, PublishInput } from '../kvs/types.js';
import type { TransferClient } from '../dtl/types.js';
import { DyadError, errnoName, errnoOf, errnos } from '../errors.js';
import type { Storage } from './storage.js';
import type { Origin, OriginCopy } from './origin.js';
import { landWhole } from '../dtl/sink.js';

export const pullChannel = diagnostics.channel('dyad-fs:dmd:pull');

/**
 * Where nodes record the copies they pulled: REPLICAS/<rank>/<upath>, in the
 * same namespace (hidden from listings), so a reader can fall back to a copy
 * when the owner is gone.
 */
export const REPLICAS = '.dyad-replicas';

export function replicaPath(rank: number, upath: string): string {
  return `${REPLICAS}/${rank}/${upath}`;
}

export interface FetchLog {
  debug(msg: string): void;
  info(msg: string): void;
  error(msg: string): void;
}

export interface FetcherOptions {
  kvs: Kvs;
  ns: string;
  rank: number;
  /** Ranks per node sharing one storage (DYAD_SERVICE_MUX). */
  serviceMux: number;
  /** Storage is shared by all nodes: never transfer. */
  sharedStorage: boolean;
  transfer?: TransferClient;
  /** The transport's name, as ranks register it (RankInfo.meta.dtl). */
  dtlName?: string;
  storage: Storage;
  peerTimeoutMs: number;
  /** The registry's rank lease (--rank-lease); default 10 s. */
  rankLeaseMs?: number;
  /** Where a file no node has is copied from (then published as ours). */
  origin?: Origin;
  log: FetchLog;
  /** A copy of another owner's file landed in storage (pulled, or with its publication). */
  onCopy?: (upath: string, rec: FileRecord) => void;
  /** A copy of the origin's file landed in storage, published as ours. */
  onOriginCopy?: (upath: string, rec: FileRecord) => void;
}

interface Flight {
  promise: Promise<FileRecord>;
  waiters: number;
  controller: AbortController;
}

/** Copy records wait at most this long, or until this many are pending. */
const REPLICA_DELAY_MS = 20;
const REPLICA_BATCH = 256;
/** How long a rank's address is used before the registry is asked again, at most (see addressOf). */
const ADDRESS_TTL_MS = 1000;

export class Fetcher {
  private readonly flights = new Map<string, Flight>();
  /** Ranks' transfer addresses, and when the registry gave them (performance.now()). */
  private readonly addresses = new Map<number, { address: string; at: number }>();
  private readonly copies = new Map<string, PublishInput>();
  private copyTimer: NodeJS.Timeout | undefined;

  constructor(private readonly o: FetcherOptions) {}

  /** Does a file owned by `owner` already sit in our storage? */
  isLocalOwner(owner: number): boolean {
    if (this.o.sharedStorage || owner === this.o.rank) return true;
    const mux = Math.max(1, this.o.serviceMux);
    return Math.floor(owner / mux) === Math.floor(this.o.rank / mux);
  }

  /**
   * Resolves once upath is published and its content is in local storage
   * (for a directory: once it exists locally).
   */
  ensureLocal(upath: string, opts: { signal?: AbortSignal; timeoutMs?: number; known?: FileRecord; originFirst?: boolean } = {}): Promise<FileRecord> {
    let flight = this.flights.get(upath);
    if (!flight) {
      const controller = new AbortController();
      const promise = this.fetch(upath, controller.signal, opts.known, opts.originFirst).finally(() => this.flights.delete(upath));
      flight = { promise, waiters: 0, controller };
      this.flights.set(upath, flight);
    }
    const f = flight;
    f.waiters++;
    return new Promise<FileRecord>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      let done = false;
      const leave = (err?: DyadError) => {
        if (done) return;
        done = true;
        if (timer) clearTimeout(timer);
        opts.signal?.removeEventListener('abort', onAbort);
        if (--f.waiters === 0 && err) f.controller.abort(err);
      };
      const onAbort = () => {
        const err = new DyadError('DYAD_EINTR', errnos.EINTR, `${upath}: wait interrupted`);
        leave(err);
        reject(err);
      };
      if (opts.signal?.aborted) return onAbort();
      opts.signal?.addEventListener('abort', onAbort, { once: true });
      if (opts.timeoutMs !== undefined) {
        timer = setTimeout(() => {
          const err = new DyadError('DYAD_ETIMEDOUT', errnos.ETIMEDOUT, `${upath}: not published within ${opts.timeoutMs} ms`);
          leave(err);
          reject(err);
        }, opts.timeoutMs);
      }
      f.promise.then(
        (rec) => {
          leave();
          resolve(rec);
        },
        (err: unknown) => {
          leave();
          reject(err);
        },
      );
    });
  }

  /**
   * `known`: the record the caller already has (saves a round trip).
   * `originFirst`: the caller has just seen no record (saves the round trip
   * asking again; a publication in between only costs an equal copy).
   */
  private async fetch(upath: string, signal: AbortSignal, known?: FileRecord, originFirst = false, again = false): Promise<FileRecord> {
    let rec = known ?? (originFirst && this.o.origin ? undefined : await this.o.kvs.lookup(this.o.ns, upath));
    if (!rec && this.o.origin) {
      const copied = await this.fromOrigin(upath, signal);
      if (copied) return copied;
    }
    rec ??= await this.o.kvs.wait(this.o.ns, upath, { signal });
    const dest = this.o.storage.abs(upath);
    if (rec.kind === 'dir') {
      fs.mkdirSync(dest, { recursive: true, mode: 0o755 });
      return rec;
    }
    if (this.isLocalOwner(rec.owner)) {
      if (fs.existsSync(dest)) return rec;
      // Ours, from the origin, and evicted while its record was being
      // withdrawn: the origin still has it.
      const copied = rec.owner === this.o.rank && this.o.origin ? await this.fromOrigin(upath, signal) : undefined;
      if (copied) return copied;
      // Another rank counted as this node's (DYAD_SERVICE_MUX) whose file is
      // not here: the ranks do not share one storage after all.
      const why =
        rec.owner === this.o.rank || this.o.sharedStorage
          ? `published by rank ${rec.owner} on this storage but missing from it`
          : `published by rank ${rec.owner}, which DYAD_SERVICE_MUX=${this.o.serviceMux} puts on this node, but missing from this node's storage: do its ranks share one storage?`;
      this.o.log.error(`${upath}: ${why}`);
      throw new DyadError('DYAD_EMISSING', errnos.EIO, `${upath}: ${why}`);
    }
    if (!this.o.transfer) throw new DyadError('DYAD_ENODTL', errnos.EIO, `${upath}: no transfer service configured`);
    this.ensureDir(path.dirname(dest));
    if (this.landPushed(upath, rec, dest)) {
      this.o.onCopy?.(upath, rec);
      return rec;
    }
    try {
      await this.pullFrom(rec.owner, upath, rec, dest, signal);
    } catch (err) {
      const errno = errnoOf(err);
      if (errno === errnos.EINTR || errno === errnos.ENOSPC) throw err;
      // The record may be older than the file (read from this node's cache
      // before the news of a rewrite arrived): the store's current one
      // decides, once. A replica or the origin would hand back old bytes.
      if (!again) {
        const kvs = this.o.kvs;
        const now = await (kvs.lookupFresh ? kvs.lookupFresh(this.o.ns, upath) : kvs.lookup(this.o.ns, upath)).catch(() => rec);
        if (now === undefined || now.version !== rec.version || now.owner !== rec.owner || now.digest !== rec.digest) {
          this.o.log.debug(`${upath}: its record changed during the pull (${errnoName(errno)}); fetching the current one`);
          // Withdrawn (its file rewritten, or an origin copy evicted):
          // fetched as a name nobody publishes, from the origin if it has
          // it, else waited for.
          return this.fetch(upath, signal, now, false, true);
        }
      }
      // The owner is gone or lost the file: a node that pulled it earlier may still have it.
      if (!(await this.pullFromReplica(upath, rec, dest, signal))) {
        // Or the origin has it: this node then takes over as its owner.
        const copied = this.o.origin ? await this.fromOrigin(upath, signal) : undefined;
        if (copied) return copied;
        throw err;
      }
    }
    this.recordCopy(upath, rec);
    this.o.onCopy?.(upath, rec);
    return rec;
  }

  /** Is a fetch of upath under way? */
  fetching(upath: string): boolean {
    return this.flights.has(upath);
  }

  /** This node no longer holds its copy of upath: the others stop counting on it. */
  dropCopy(upath: string): void {
    if (this.copies.delete(upath)) return; // its record was not sent yet
    this.o.kvs.unpublish(this.o.ns, replicaPath(this.o.rank, upath)).catch((e: Error) => this.o.log.debug(`replica record for ${upath}: ${e.message}`));
  }

  /**
   * Copies upath from the origin into storage and publishes it as ours, so
   * the next reader anywhere pulls it from here; undefined when the origin
   * has no such file. Another node may copy the same file at the same time:
   * both copies are whole and equal, and the later publication wins.
   */
  private async fromOrigin(upath: string, signal: AbortSignal): Promise<FileRecord | undefined> {
    const origin = this.o.origin!;
    const dest = this.o.storage.abs(upath);
    const st = origin.stat(upath);
    if (!st) return undefined;
    if (st.kind === 'dir') {
      fs.mkdirSync(dest, { recursive: true, mode: 0o755 });
      return { owner: -1, size: 0, mode: st.mode, mtimeMs: st.mtimeMs, digest: '', version: 0, kind: 'dir' };
    }
    this.ensureDir(path.dirname(dest));
    const started = process.hrtime.bigint();
    let c: OriginCopy | undefined;
    try {
      c = await origin.copy(upath, dest, signal);
    } catch (err) {
      if (errnoOf(err) !== errnos.EINTR) this.o.log.error((err as Error).message);
      throw err;
    }
    if (!c) return undefined;
    const rec = await this.o.kvs.publish(this.o.ns, upath, { owner: this.o.rank, size: c.size, mode: c.mode, mtimeMs: c.mtimeMs, digest: c.digest });
    this.o.onOriginCopy?.(upath, rec);
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    if (pullChannel.hasSubscribers) pullChannel.publish({ upath, owner: -1, bytes: c.size, ms, origin: true });
    this.o.log.debug(`copied ${upath} (${c.size} B) from the origin in ${ms.toFixed(2)} ms and published it`);
    return rec;
  }

  /**
   * Tells the others this node now holds a copy, in case the owner goes
   * away. Nobody waits on these records, so they are sent in batches: a
   * stream of small pulls then costs the KVS one write (and each watcher
   * one event frame) per batch instead of per file.
   */
  private recordCopy(upath: string, rec: FileRecord): void {
    this.copies.set(upath, { owner: this.o.rank, size: rec.size, mode: rec.mode, mtimeMs: rec.mtimeMs, digest: rec.digest });
    if (this.copies.size >= REPLICA_BATCH) this.flushCopies();
    else this.copyTimer ??= setTimeout(() => this.flushCopies(), REPLICA_DELAY_MS);
  }

  /** Sends the copy records not sent yet; resolves when the KVS has them. */
  flushCopies(): Promise<void> {
    if (this.copyTimer) clearTimeout(this.copyTimer);
    this.copyTimer = undefined;
    const batch = [...this.copies];
    this.copies.clear();
    return Promise.all(
      batch.map(([upath, input]) =>
        this.o.kvs.publish(this.o.ns, replicaPath(this.o.rank, upath), input).catch((e: Error) => this.o.log.debug(`replica record for ${upath}: ${e.message}`)),
      ),
    ).then(() => undefined);
  }

  private async pullFrom(rank: number, upath: string, rec: FileRecord, dest: string, signal: AbortSignal): Promise<void> {
    let address: string | undefined;
    const started = process.hrtime.bigint();
    try {
      address = await this.addressOf(rank);
      const { bytes } = await this.o.transfer!.pull(
        address,
        { upath, size: rec.size, digest: rec.digest },
        dest,
        { signal, peerTimeoutMs: this.o.peerTimeoutMs, mode: rec.mode & 0o7777 },
      );
      const ms = Number(process.hrtime.bigint() - started) / 1e6;
      if (pullChannel.hasSubscribers) pullChannel.publish({ upath, owner: rank, bytes, ms });
      this.o.log.debug(`pulled ${upath} (${bytes} B) from rank ${rank} in ${ms.toFixed(2)} ms`);
    } catch (err) {
      // The owner may have restarted on another port: ask the registry again next time.
      this.addresses.delete(rank);
      const errno = errnoOf(err);
      if (errno === errnos.EINTR) throw err;
      this.o.log.error(`pull of ${upath} from rank ${rank}${address ? ` (${address})` : ''} failed: ${(err as Error).message}`);
      const out = errno === errnos.ENOSPC ? errnos.ENOSPC : errnos.EIO;
      throw new DyadError('DYAD_EPULL', out, `${upath}: pull from rank ${rank} failed: ${(err as Error).message}`, { cause: err });
    }
  }

  /**
   * A small file whose bytes came with its publication: write them here
   * instead of asking the owner. Any doubt (wrong digest, a local error)
   * falls back to the pull.
   */
  private landPushed(upath: string, rec: FileRecord, dest: string): boolean {
    const content = this.o.kvs.takePushedContent?.(this.o.ns, upath, rec);
    if (content === undefined) return false;
    try {
      landWhole(dest, content, rec, rec.mode & 0o7777, `rank ${rec.owner}'s publication`, upath);
    } catch (err) {
      this.o.log.info(`${(err as Error).message}; pulling it instead`);
      return false;
    }
    if (pullChannel.hasSubscribers) pullChannel.publish({ upath, owner: rec.owner, bytes: content.byteLength, ms: 0, pushed: true });
    this.o.log.debug(`${upath} (${content.byteLength} B) came with rank ${rec.owner}'s publication`);
    return true;
  }

  /** Tries every node that recorded a copy of this exact version. */
  private async pullFromReplica(upath: string, rec: FileRecord, dest: string, signal: AbortSignal): Promise<boolean> {
    let holders: number[];
    try {
      holders = (await this.o.kvs.list(this.o.ns, REPLICAS)).map((e) => Number(e.name)).filter((r) => r !== rec.owner && r !== this.o.rank);
    } catch {
      return false;
    }
    for (const rank of holders) {
      const copy = await this.o.kvs.lookup(this.o.ns, replicaPath(rank, upath)).catch(() => undefined);
      if (!copy || copy.digest !== rec.digest || copy.size !== rec.size) continue;
      try {
        await this.pullFrom(rank, upath, rec, dest, signal);
        this.o.log.info(`pulled ${upath} from rank ${rank}'s copy (owner rank ${rec.owner} failed)`);
        return true;
      } catch {
        /* try the next one */
      }
    }
    return false;
  }

  /** Directories known to exist, so a pull does not mkdir its parent each time. */
  private readonly dirs = new Set<string>();

  /** After a directory was removed or renamed: trust nothing cached. */
  forgetDirs(): void {
    this.dirs.clear();
  }

  private ensureDir(dir: string): void {
    if (this.dirs.has(dir)) return;
    fs.mkdirSync(dir, { recursive: true, mode: 0o755 });
    if (this.dirs.size > 10_000) this.dirs.clear();
    this.dirs.add(dir);
  }

  /**
   * A rank's address, asked of the registry again once it is a second old
   * (a quarter of the rank lease, if that is shorter): a node whose lease
   * ran out (it died) must fail readers at once, not make them wait out a
   * connection to it.
   */
  private async addressOf(rank: number): Promise<string> {
    const known = this.addresses.get(rank);
    const now = performance.now();
    if (known && now - known.at < Math.min(ADDRESS_TTL_MS, (this.o.rankLeaseMs ?? 10_000) / 4)) return known.address;
    const info = await this.o.kvs.lookupRank(this.o.ns, rank);
    if (!info) {
      this.addresses.delete(rank);
      throw new DyadError('DYAD_ENORANK', errnos.EIO, `rank ${rank} has no transfer address registered`);
    }
    // Each transport would only find the other's greeting garbled.
    const theirs = info.meta?.['dtl'];
    if (theirs !== undefined && this.o.dtlName !== undefined && theirs !== this.o.dtlName) {
      throw new DyadError('DYAD_EDTLMODE', errnos.EIO, `rank ${rank} transfers over ${theirs.toUpperCase()} and this node over ${this.o.dtlName.toUpperCase()}: every node needs the same DYAD_DTL_MODE`);
    }
    this.addresses.set(rank, { address: info.address, at: now });
    return info.address;
  }
}
