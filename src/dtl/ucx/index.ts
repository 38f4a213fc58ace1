/**
 * The UCX transfer backend: what DYAD_DTL_MODE=UCX selects when the
 * optional addon (native/ucx) was built. A small authenticated TCP
 * connection carries requests, errors and small files; file bodies move
 * over UCX, so on InfiniBand/RoCE they go by RDMA and between processes on
 * one host by shared memory, without passing through the kernel's TCP stack.
 *
 * Data path. Two were built and measured (bench/transfer-ucx.ts, project VM,
 * UCX 1.13.1, UCX_TLS=tcp over loopback, 16 x 64 MiB pulls, 3 rounds):
 *   (a) 'get': the owner mmaps and registers the file, the consumer reads it
 *       with ucp_get (4 MiB, 6 in flight):            ~0.9-1.0 GB/s
 *   (b) 'am':  the owner sends 4 MiB chunks as rendezvous active messages
 *       (the consumer's UCX pulls each into its own registered buffer):
 *                                                    ~1.9-2.3 GB/s
 * (b) is the default. Over TCP, UCX emulates get in software and every get
 * needs the owner's progress to answer it, while rendezvous streams; on an
 * RDMA fabric (b) becomes an RDMA read as well (get-zcopy rendezvous), so
 * it loses nothing there. (a) also exposes the owner to a consumer's gets
 * for as long as the mapping lives (a truncated file means SIGBUS, an
 * early unmap a crash over TCP), pins the whole file when registered on
 * InfiniBand, and needs an extra END message; (b) reads into bounded
 * staging buffers and fails cleanly.
 *
 * (Those figures predate the chunk mover: a native thread with a UCP
 * worker of its own (native/ucx/mover.h) now reads and sends on the owner
 * and receives, writes and checksums on the consumer, and a consumer pulls
 * at most maxBulkPerPeer (2) chunked files from one owner at once. Same
 * bench, 512 KiB chunks: 1.4-1.7 GB/s against 0.6-0.7 before, consumer
 * main thread 0.01-0.04 CPU-s per GiB against 1.0-1.4.)
 *
 * Unlike DYAD's UCX DTL (a single ucp_put into a 4 GiB window preallocated
 * in every process, a busy-polled sentinel, no timeout), transfers are
 * chunked with bounded buffers on both sides, every wait has a deadline,
 * and a failure or abort leaves no partial file.
 *
 * On a cluster, set the usual UCX variables in the daemon's environment:
 * UCX_TLS (e.g. rc,sm,self for InfiniBand; exclude sm to force the network
 * between two daemons on one host) and UCX_NET_DEVICES (e.g. mlx5_0:1),
 * otherwise UCX uses every device it finds.
 */
import { ConfigError, errnos } from '../../errors.js';
import type { TransferBackend, TransferClient, TransferServer } from '../types.js';
import { UcxTransferClient, type UcxClientOptions, type UcxDataPath } from './client.js';
import { loadUcx, type UcxAddon } from './native.js';
import { UcxRuntime, transportsOf, type UcxRuntimeOptions } from './runtime.js';
import { UcxTransferServer, type UcxServeOptions } from './server.js';

export type { UcxClientOptions, UcxDataPath } from './client.js';
export type { UcxServeOptions } from './server.js';

export const UCX_NOT_BUILT = 'UCX transport not built (install libucx-dev and run npm run build)';

export interface UcxBackendOptions extends UcxRuntimeOptions {
  /** Default data path of this backend's clients. */
  dataPath?: UcxDataPath;
}

export interface UcxInfo {
  built: boolean;
  /** Why the addon is unavailable, when it is. */
  reason?: string;
  /** libucp version, e.g. "1.13.1". */
  version?: string;
  /** UCX_TLS / UCX_NET_DEVICES as configured (environment, then backend options). */
  tls: string;
  netDevices: string;
  /** Transport/device pairs the UCP context opened, e.g. ["tcp/lo", "sysv/memory"]. */
  transports: string[];
  /** Per connected peer: the lanes UCX chose (ucp_ep_print_info), when a backend is given. */
  endpoints?: string[];
}

export interface UcxBackend extends TransferBackend {
  readonly name: 'ucx';
  serve(opts: UcxServeOptions): Promise<TransferServer>;
  client(opts: UcxClientOptions): TransferClient;
  /** What this backend's worker uses (creates no worker if none is running). */
  info(): UcxInfo;
  /** The running worker's counters and its chunk movers' (undefined when none is running). */
  stats(): (ReturnType<UcxRuntime['worker']['stats']> & { movers: ReturnType<UcxRuntime['moverStats']> }) | undefined;
}

function requireAddon(): UcxAddon {
  const { addon, error } = loadUcx();
  if (!addon) throw new ConfigError(`${UCX_NOT_BUILT}: ${error ?? 'unknown reason'}`, errnos.ENOTSUP);
  return addon;
}

/** True when the addon is built and loads. */
export function ucxAvailable(): boolean {
  return loadUcx().addon !== null;
}

/**
 * The UCX version and the transports a worker with this configuration
 * opens (a short-lived probe worker, for `dyad config`). Never throws.
 */
export function ucxInfo(config: Record<string, string> = {}): UcxInfo {
  const tls = config.TLS ?? process.env.UCX_TLS ?? 'all';
  const netDevices = config.NET_DEVICES ?? process.env.UCX_NET_DEVICES ?? 'all';
  const { addon, error } = loadUcx();
  if (!addon) return { built: false, reason: `${UCX_NOT_BUILT}: ${error ?? ''}`, tls, netDevices, transports: [] };
  const info: UcxInfo = { built: true, version: addon.version(), tls, netDevices, transports: [] };
  try {
    const w = new addon.Worker(config, 'dyad-probe');
    try {
      info.transports = transportsOf(w.info());
    } finally {
      w.close();
    }
  } catch (err) {
    info.reason = `cannot open a UCX worker: ${err instanceof Error ? err.message : String(err)}`;
  }
  return info;
}

export function createUcxBackend(opts: UcxBackendOptions = {}): UcxBackend {
  let rt: UcxRuntime | null = null;
  const acquire = (): UcxRuntime => {
    if (!rt || rt.isClosed) {
      const created: UcxRuntime = new UcxRuntime(requireAddon(), opts, () => {
        if (rt === created) rt = null;
      });
      rt = created;
    }
    return rt.retain();
  };
  return {
    name: 'ucx',
    async serve(o: UcxServeOptions): Promise<TransferServer> {
      const r = acquire();
      try {
        return await UcxTransferServer.listen(o, r);
      } catch (err) {
        r.release();
        throw err;
      }
    },
    client(o: UcxClientOptions): TransferClient {
      const r = acquire();
      try {
        return new UcxTransferClient({ dataPath: opts.dataPath, ...o }, r);
      } catch (err) {
        r.release();
        throw err;
      }
    },
    stats() {
      return rt && !rt.isClosed ? { ...rt.worker.stats(), movers: rt.moverStats() } : undefined;
    },
    info(): UcxInfo {
      const tls = opts.config?.TLS ?? process.env.UCX_TLS ?? 'all';
      const netDevices = opts.config?.NET_DEVICES ?? process.env.UCX_NET_DEVICES ?? 'all';
      if (!rt || rt.isClosed) return ucxInfo(opts.config);
      const d = rt.describe();
      return { built: true, version: rt.addon.version(), tls, netDevices, transports: transportsOf(d.context), endpoints: d.endpoints };
    },
  };
}

/** The backend DYAD_DTL_MODE=UCX selects: UCX configured from the environment. */
export const ucxBackend: UcxBackend = createUcxBackend();
