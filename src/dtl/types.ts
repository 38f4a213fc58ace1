/**
 * The data transfer layer (DTL) contract: how one node pulls a published
 * file from the node that owns it. It is deliberately backend-neutral so a
 * UCX/RDMA backend can sit beside the TCP one: nothing here mentions sockets,
 * and the only address a caller handles is the opaque string the owner's
 * server reports.
 *
 * Unlike DYAD's DTLs (whole-file buffers, no checksum, a partial copy left in
 * place, no timeouts) every pull is streamed, verified against the digest
 * the producer published, and lands by an atomic rename or not at all.
 */

/** What the consumer knows about the file from the metadata store. */
export interface PullRequest {
  /** Path relative to the owner's storage root, '/'-separated, no '..'. */
  upath: string;
  /** Size in bytes the producer published; a different size fails the pull. */
  size: number;
  /** Expected content digest, as produced by src/dtl/digest.ts ("crc32:xxxxxxxx"). */
  digest: string;
}

export interface PullOptions {
  /** Aborting rejects the pull with errno EINTR and removes the temp file. */
  signal?: AbortSignal;
  /** Longest silence from the peer (connect, handshake, data) before EIO. */
  peerTimeoutMs?: number;
  /** Permission bits for the new file (applied exactly, umask ignored). */
  mode?: number;
  /** fsync the file (and its directory after the rename) before resolving. */
  fsync?: boolean;
}

export interface PullResult {
  bytes: number;
}

export interface TransferServer {
  /** "host:port" actually bound (IPv6 as "[addr]:port"); give it to clients as is. */
  readonly address: string;
  /** Stops listening and drops every connection, including transfers in flight. */
  close(): Promise<void>;
}

export interface TransferClient {
  /**
   * Pulls `req.upath` from the peer at `address` into `destPath` atomically.
   * The bytes stream (with backpressure) into a temp file named
   * ".dyad-part-*" in destPath's directory; size and digest are checked, the
   * file is optionally fsynced, then renamed into place. On failure the temp
   * file is removed and the promise rejects with a DyadError:
   *  - peer unreachable, refused, reset, closed, silent: DYAD_EPEER / EIO
   *  - file missing at the owner: DYAD_ENOENT_REMOTE / EIO
   *  - owner refused the path (escape, symlink): DYAD_EFORBIDDEN / EACCES
   *  - other error at the owner (not a regular file, read error): DYAD_EREMOTE / EIO
   *  - shared secret mismatch: DYAD_EAUTH / EACCES
   *  - size or digest mismatch: DYAD_EDIGEST / EIO
   *  - local disk full: DYAD_ENOSPC / ENOSPC; other local errors: DYAD_ELOCAL / their errno
   *  - aborted through opts.signal: DYAD_EINTR / EINTR
   */
  pull(address: string, req: PullRequest, destPath: string, opts?: PullOptions): Promise<PullResult>;
  /** Closes pooled connections; pulls still running are failed with DYAD_EPEER. */
  close(): Promise<void>;
}

export interface ServeOptions {
  /**
   * Directory served. May be a "/proc/self/fd/N" path naming a directory fd
   * opened before a FUSE mount was stacked on the same directory: it is only
   * ever joined with relative paths, never resolved.
   */
  root: string;
  host: string;
  /** 0 picks a free port; TransferServer.address tells which. */
  port: number;
  /** Shared secret for the HMAC challenge-response on every connection. */
  secret: string;
}

export interface TransferBackend {
  readonly name: string;
  serve(opts: ServeOptions): Promise<TransferServer>;
  client(opts: { secret: string }): TransferClient;
}
