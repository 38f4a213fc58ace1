/**
 * Entry point of the data transfer layer: picks a backend the way DYAD
 * parses DYAD_DTL_MODE, and re-exports what other layers use.
 *
 * DYAD matches with strncmp(given, name, strlen(given)), i.e. the value is a
 * case-sensitive prefix of a mode name: "" / "F" / "FLUX" / "FLUX_RPC" mean
 * FLUX_RPC, "U" / "UC" / "UCX" mean UCX, "M" ... "MARGO" mean MARGO. dyad-fs
 * has no Flux broker, so FLUX_RPC (the default) is served by the TCP backend,
 * which can also be named "TCP" (or a prefix of it, "T"/"TC"). UCX selects
 * the UCX backend (src/dtl/ucx) when its optional addon was built, and is
 * refused with a clear message otherwise; MARGO is not planned.
 */
import { ConfigError, errnos } from '../errors.js';
import { tcpBackend } from './tcp/index.js';
import type { TransferBackend } from './types.js';
import { UCX_NOT_BUILT, ucxAvailable, ucxBackend } from './ucx/index.js';

export type { PullOptions, PullRequest, PullResult, ServeOptions, TransferBackend, TransferClient, TransferServer } from './types.js';
export { DTL_CODES } from './errors.js';
export { PART_PREFIX } from './part.js';
export { DIGEST_ALGO, Digester, algoOf, crc32IsNative, crc32cIsNative, crc32Update, crcUpdate, digestBuffer, digestFile, formatDigest, isDigest, sameDigest, type DigestAlgo } from './digest.js';
export { tcpBackend } from './tcp/index.js';
export { UCX_NOT_BUILT, createUcxBackend, ucxAvailable, ucxBackend, ucxInfo, type UcxBackend, type UcxInfo } from './ucx/index.js';

function allowed(): string {
  return `FLUX_RPC (default; served over TCP), TCP, UCX${ucxAvailable() ? '' : ' (not built)'}`;
}

function isPrefixOf(given: string, name: string): boolean {
  return name.startsWith(given);
}

export function backendFor(mode: string): TransferBackend {
  if (isPrefixOf(mode, 'FLUX_RPC') || (mode !== '' && isPrefixOf(mode, 'TCP'))) return tcpBackend;
  if (isPrefixOf(mode, 'UCX')) {
    if (ucxAvailable()) return ucxBackend;
    throw new ConfigError(`${UCX_NOT_BUILT}: DYAD_DTL_MODE=${JSON.stringify(mode)} selects UCX; use FLUX_RPC or TCP`, errnos.ENOTSUP);
  }
  if (isPrefixOf(mode, 'MARGO')) {
    throw new ConfigError(`DYAD_DTL_MODE=${JSON.stringify(mode)} selects MARGO, which dyad-fs does not implement; allowed: ${allowed()}`);
  }
  throw new ConfigError(`DYAD_DTL_MODE=${JSON.stringify(mode)} is not a transfer mode; allowed (case-sensitive, prefixes accepted): ${allowed()}`);
}
