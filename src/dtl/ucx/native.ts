/**
 * Typed access to the optional UCX addon (native/ucx, built as dyaducx.node
 * only where libucx-dev is installed). Loading never throws: a missing or
 * unloadable addon is reported through `ucxLoadError` so that selecting UCX
 * can say why it is unavailable while every other transport keeps working.
 */
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

/** A registered memory region (a buffer, or a read-only mapping of a file). */
export interface UcxRegion {
  /** Packed remote key a peer unpacks to read this region with get. */
  rkey(): Buffer;
  address(): bigint;
  length(): number;
  release(): void;
}

export interface UcxRemoteKey {
  destroy(): void;
}

export interface UcxEndpoint {
  /** Rejects with a UCS_ERR_* coded Error if the endpoint failed or closed. */
  amSend(id: number, header: Uint8Array, data: Uint8Array | null, flags: number, region?: UcxRegion | null): Promise<void>;
  get(dest: Uint8Array, remoteAddress: bigint, rkey: UcxRemoteKey, region?: UcxRegion | null): Promise<void>;
  unpackRkey(packed: Uint8Array): UcxRemoteKey;
  /** ucp_ep_print_info: the lanes and transports this endpoint uses. */
  info(): string;
  /** 'open', 'closed', or the UCS_ERR_* code it failed with. */
  state(): string;
  /** Force cancels requests in flight; a failed endpoint is always forced. */
  close(force: boolean): Promise<void>;
}

/**
 * Called for each active message. `desc` is non-zero for a rendezvous
 * message whose `length` bytes are still at the sender: fetch them with
 * amRecv(desc, ...) or drop them with amRelease(desc), exactly once.
 * Otherwise `data` holds the (eager) payload.
 */
export type UcxAmHandler = (header: Buffer, length: number, desc: number, data: Buffer | undefined) => void;

export interface UcxWorker {
  address(): Buffer;
  /**
   * `peerErrors` (default true) asks UCX to detect a dead peer and fail its
   * requests; shared-memory transports cannot, and are unusable with it.
   */
  connect(address: Uint8Array, onError: (code: string, message: string) => void, peerErrors?: boolean): UcxEndpoint;
  setAmHandler(id: number, fn: UcxAmHandler | null): void;
  amRecv(desc: number, dest: Uint8Array, region?: UcxRegion | null): Promise<number>;
  amRelease(desc: number): void;
  register(buf: Uint8Array): UcxRegion;
  mapFile(fd: number, length: number): UcxRegion;
  /** ucp_context_print_info + ucp_worker_print_info. */
  info(): string;
  /** Microseconds to keep polling after the worker goes quiet while requests are in flight (default 0). */
  setSpin(microseconds: number): void;
  /** Counters for tests and diagnosis; `wakeups` counts event-fd wake-ups, `pumps` progress passes, `progressMs` time inside them. */
  stats(): { inFlight: number; endpoints: number; regions: number; heldMessages: number; closed: boolean; wakeups: number; pumps: number; progressMs: number };
  close(): void;
}

/**
 * A UCX worker on a native thread that sends files as chunk messages
 * (16-byte header: 8-byte token, u64 BE offset) and receives them straight
 * into files, with their CRC (native/ucx/mover.h). One job per token and
 * direction.
 */
export interface UcxChunkMover {
  address(): Buffer;
  /** Receives `size` bytes in `chunkBytes` chunks into fd (a dup is used), at most `buffers` chunks held, digested with `algo`. */
  start(token: Buffer, fd: number, size: number, chunkBytes: number, buffers: number, algo: 'crc32c' | 'crc32'): void;
  /** Ends the job if it still runs (no callback) and forgets it. */
  cancel(token: Buffer): void;
  /** Bytes written so far, or -1 for a job it does not know. */
  received(token: Buffer): number;
  /** Sends the file's chunks (read from a dup of fd) to the worker at `peer`, `window` in flight. */
  send(token: Buffer, peer: Uint8Array, fd: number, size: number, chunkBytes: number, window: number): void;
  /** Stops a send job (no callback) and forgets it; `force` also closes the endpoint to its peer. */
  cancelSend(token: Buffer, force: boolean): void;
  /** Bytes whose sends completed, or -1 for a job it does not know. */
  sent(token: Buffer): number;
  /** ucp_ep_print_info of each peer it has sent to. */
  endpoints(): string[];
  /** Has the thread allocate and touch `count` buffers of `bytes` now, for the first jobs (kept within the idle-buffer bound). */
  reserve(bytes: number, count: number): void;
  /** Counters; `receiving`/`sending`: chunk operations UCX holds now (their buffers are in use). */
  stats(): { wakeups: number; chunks: number; dropped: number; buffers: number; jobs: number; sends: number; receiving: number; sending: number };
  close(): void;
}

/**
 * How a job ended: `errno` 0 means all bytes written and `crc` (of the
 * job's algorithm) covers them in file order, or for a send job (`send`)
 * all bytes sent. `fileError`: the errno came from the file, not the peer.
 */
export type UcxChunkDone = (token: Buffer, errno: number, crc: number, bytes: number, detail: string, fileError: boolean, send: boolean) => void;

export interface UcxAddon {
  /** `config` keys are UCX options without the "UCX_" prefix (TLS, NET_DEVICES...); they override the environment. */
  Worker: new (config: Record<string, string>, name: string) => UcxWorker;
  ChunkMover?: new (config: Record<string, string>, name: string, onDone: UcxChunkDone, amId: number, peerErrors: boolean) => UcxChunkMover;
  version(): string;
  amFlags: { reply: number; eager: number; rndv: number };
}

/** The error a rejected UCX operation carries. */
export interface UcxError extends Error {
  code: string;
  ucsStatus: number;
}

export function isUcxError(err: unknown): err is UcxError {
  return err instanceof Error && typeof (err as { ucsStatus?: unknown }).ucsStatus === 'number';
}

const here = path.dirname(fileURLToPath(import.meta.url));
// dist/src/dtl/ucx -> repository root
const root = path.resolve(here, '..', '..', '..', '..');
const addonPath = path.join(root, 'native', 'build', 'Release', 'dyaducx.node');

/**
 * UCX's memory hooks are off unless the operator asks for them. By default
 * the first ucp_init installs them by patching the code of mmap/munmap in
 * libc ("bistro") while V8's background threads may be running it; we saw
 * Node die with SIGSEGV in V8's page allocator right after ucp_init. The
 * hooks only feed UCX's registration cache for buffers the caller did not
 * register, and every buffer this backend hands to UCX is registered up
 * front (runtime.ts pools, file mappings), so nothing is lost. libucm reads
 * these when the library loads, hence before the require.
 */
const SAFE_DEFAULTS = [
  ['UCX_MEM_EVENTS', 'no'],
  ['UCX_MEM_MALLOC_HOOKS', 'no'],
] as const;

/**
 * UCX's tcp transport moves a rendezvous chunk in segments of this size
 * (64 KiB by default): one socket read, and one round of UCX's progress,
 * per segment. With 1 MiB segments, 16 x 64 MiB pulls between two
 * processes over loopback (bench/transfer-ucx.ts, 'am') ran at 2.32-2.99
 * GB/s against 1.68-2.10 (3 and 5 runs; 256 and 512 KiB in between), with
 * the same peak memory in both daemons. Only the tcp transport reads these;
 * an operator's own values win, and every daemon sets the same ones, so the
 * two ends of a connection agree.
 */
const UCX_TUNED_DEFAULTS = [
  ['UCX_TCP_RX_SEG_SIZE', '1m'],
  ['UCX_TCP_TX_SEG_SIZE', '1m'],
] as const;

/** `env` with the UCX settings a daemon would use where `env` sets none (for tools compared against it, e.g. ucx_perftest). */
export function withUcxDefaults(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  return fillUcxDefaults({ ...env });
}

function fillUcxDefaults(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  for (const [k, v] of [...SAFE_DEFAULTS, ...UCX_TUNED_DEFAULTS]) if (env[k] === undefined) env[k] = v;
  return env;
}

let loaded: { addon: UcxAddon | null; error: string | null } | null = null;

/** Loads the addon on first use (loading libucp is not free); null if it is not built. */
export function loadUcx(): { addon: UcxAddon | null; error: string | null } {
  if (loaded) return loaded;
  fillUcxDefaults(process.env);
  try {
    loaded = { addon: createRequire(import.meta.url)(addonPath) as UcxAddon, error: null };
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    loaded = { addon: null, error: e.code === 'MODULE_NOT_FOUND' ? `${addonPath} does not exist` : `${addonPath}: ${e.message}` };
  }
  return loaded;
}
