/**
 * The raw TCP baseline for bench/transfer.ts: one process streams N MiB over
 * a plain net.Socket in 1 MiB writes with backpressure, another receives and
 * discards, and prints GB/s. Separate processes, like two nodes.
 *
 *   node dist/bench/rawtcp.js serve HOST PORT MIB   (prints its port, then serves one connection)
 *   node dist/bench/rawtcp.js recv HOST PORT
 */
import net from 'node:net';

const [mode, host = '127.0.0.1', portArg = '0', mibArg = '1024'] = process.argv.slice(2);

if (mode === 'serve') {
  const chunk = Buffer.alloc(1 << 20, 7);
  const server = net.createServer((sock) => {
    let left = Number(mibArg);
    const pump = () => {
      while (left > 0) {
        left--;
        if (!sock.write(chunk)) return void sock.once('drain', pump);
      }
      sock.end();
      server.close();
    };
    pump();
  });
  server.listen(Number(portArg), host, () => console.log((server.address() as net.AddressInfo).port));
} else if (mode === 'recv') {
  const sock = net.connect(Number(portArg), host);
  let bytes = 0;
  let start = 0n;
  sock.on('connect', () => (start = process.hrtime.bigint()));
  sock.on('data', (d: Buffer) => (bytes += d.length));
  sock.on('end', () => {
    const s = Number(process.hrtime.bigint() - start) / 1e9;
    console.log((bytes / s / 1e9).toFixed(3));
  });
} else {
  console.error('usage: rawtcp serve|recv HOST PORT [MIB]');
  process.exit(2);
}
