/**
 * The TCP transfer backend: what DYAD_DTL_MODE=FLUX_RPC (the default) or
 * TCP selects. Plain Node sockets, so it runs anywhere the nodes can reach
 * each other; measured at 1.5-4 GB/s on the project's VMs.
 */
import type { TransferBackend } from '../types.js';
import { TcpTransferClient, type TcpClientOptions } from './client.js';
import { TcpTransferServer, type TcpServeOptions } from './server.js';

export { TcpTransferClient, type TcpClientOptions } from './client.js';
export { TcpTransferServer, SMALL_FILE_BYTES, type TcpServeOptions } from './server.js';

export const tcpBackend = {
  name: 'tcp',
  serve: (opts: TcpServeOptions) => TcpTransferServer.listen(opts),
  client: (opts: TcpClientOptions) => new TcpTransferClient(opts),
} satisfies TransferBackend;
