/**
 * Transfer-layer benchmark: TCP pull throughput next to a raw Node TCP
 * stream between the same two processes, in the same run, plus small-file
 * pull latency. Each round also pulls from an owner without sendfile and
 * with the consumer's receive thread turned off, to show what each gives. The serving side runs in a child process, as it would on
 * another node (server and client in one event loop would serialise them).
 *
 *   node dist/bench/transfer-raw.js [--dir D] [--rounds 3] [--files 16] [--mib 64]
 *        [--small 1000] [--conns 4] [--buffer-kib 1024] [--buffers 4] [--write-mode adaptive|inline|pool]
 *
 * Two properties of the project VM would otherwise be measured instead of
 * the transfer, so each round first deletes the previous output and syncs
 * (ext4 creates slow 10-30x while freed blocks are being discarded), then
 * "prefaults": a child process touches and frees 1.5x the round's bytes.
 * The VM's balloon has free page reporting, so memory idle for ~2 s goes back
 * to the host and the next GiB of page cache costs host faults: a 1 GiB
 * write(2) loop runs at 0.4-2.8 GB/s cold vs 5.5 GB/s prefaulted. Pass
 * --no-prefault to see the cold figures.
 */
import { fork, execSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createWriteStream, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { pipeline } from 'node:stream/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { digestBuffer, tcpBackend } from '../src/dtl/index.js';
import type { PullRequest } from '../src/dtl/index.js';
import type { WriteMode } from '../src/dtl/sink.js';
import { setSendfileEnabled } from '../src/dtl/sendfile.js';
import { setReceiveThreadEnabled } from '../src/dtl/receive.js';

const SECRET = 'bench-secret';
const RAW_CHUNK = 1 << 20;

interface Ready {
  pullAddress: string;
  rawPort: number;
}

/** Child: serves `root` over the transfer server and a raw byte streamer. */
async function child(root: string, sendfile: boolean): Promise<void> {
  setSendfileEnabled(sendfile);
  const server = await tcpBackend.serve({ root, host: '127.0.0.1', port: 0, secret: SECRET });
  const chunk = Buffer.alloc(RAW_CHUNK, 7);
  // Raw baseline: on an 8-byte length request, write that many bytes from memory in 1 MiB writes.
  const raw = net.createServer({ noDelay: true }, (s) => {
    s.once('data', (d: Buffer) => {
      let left = Number(d.readBigUInt64LE(0));
      const pump = (): void => {
        while (left > 0) {
          const n = Math.min(RAW_CHUNK, left);
          left -= n;
          if (!s.write(n === RAW_CHUNK ? chunk : chunk.subarray(0, n))) {
            s.once('drain', pump);
            return;
          }
        }
      };
      pump();
    });
    s.on('error', () => s.destroy());
  });
  await new Promise<void>((r) => raw.listen(0, '127.0.0.1', r));
  const ready: Ready = { pullAddress: server.address, rawPort: (raw.address() as net.AddressInfo).port };
  process.send!(ready);
  process.on('disconnect', () => process.exit(0));
}

function rawStream(port: number, total: number, onread: boolean): Promise<number> {
  return new Promise((resolve, reject) => {
    let got = 0;
    const t0 = process.hrtime.bigint();
    const done = (): void => {
      sock.destroy();
      resolve(Number(process.hrtime.bigint() - t0) / 1e9);
    };
    const opts: net.NetConnectOpts = { host: '127.0.0.1', port, noDelay: true };
    if (onread) {
      opts.onread = {
        buffer: Buffer.allocUnsafe(4 << 20),
        callback: (n: number) => {
          got += n;
          if (got >= total) done();
          return true;
        },
      };
    }
    const sock = net.connect(opts, () => {
      const h = Buffer.alloc(8);
      h.writeBigUInt64LE(BigInt(total));
      sock.write(h);
    });
    sock.on('error', reject);
    if (!onread) {
      sock.on('data', (d: Buffer) => {
        got += d.length;
        if (got >= total) done();
      });
    }
  });
}

/** Baseline with the same disk work: `files` raw streams piped into files, all at once. */
async function rawToFiles(port: number, files: number, bytes: number, dir: string): Promise<number> {
  const t0 = process.hrtime.bigint();
  await Promise.all(
    Array.from({ length: files }, (_, i) => {
      const sock = net.connect({ host: '127.0.0.1', port, noDelay: true }, () => {
        const h = Buffer.alloc(8);
        h.writeBigUInt64LE(BigInt(bytes));
        sock.write(h);
      });
      let got = 0;
      sock.on('data', (d: Buffer) => {
        got += d.length;
        if (got >= bytes) sock.end();
      });
      return pipeline(sock, createWriteStream(join(dir, `raw${i}`), { highWaterMark: 1 << 20 }));
    }),
  );
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

function settle(dir: string, prefaultBytes: number): void {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  execSync('sync');
  if (prefaultBytes > 0) {
    execSync(`${JSON.stringify(process.execPath)} -e "const n=${prefaultBytes}, c=1<<30; for (let o=0; o<n; o+=c) Buffer.alloc(Math.min(c, n-o), 1)"`);
  }
}

function pct(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))]!;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      dir: { type: 'string' },
      rounds: { type: 'string', default: '3' },
      files: { type: 'string', default: '16' },
      mib: { type: 'string', default: '64' },
      small: { type: 'string', default: '1000' },
      conns: { type: 'string', default: '4' },
      'buffer-kib': { type: 'string', default: '1024' },
      buffers: { type: 'string', default: '4' },
      'write-mode': { type: 'string', default: 'adaptive' },
      prefault: { type: 'boolean', default: true },
    },
    allowNegative: true,
  });
  const base = values.dir ?? mkdtempSync(join(tmpdir(), 'dyad-bench-'));
  const root = join(base, 'root');
  const out = join(base, 'out');
  const nBig = Number(values.files);
  const bigBytes = Number(values.mib) << 20;
  const nSmall = Number(values.small);
  mkdirSync(root, { recursive: true });

  // Distinct content per file so a mixed-up transfer fails its digest.
  const big: PullRequest[] = [];
  const seed = randomBytes(bigBytes);
  for (let i = 0; i < nBig; i++) {
    seed.writeUInt32LE(i, 0);
    writeFileSync(join(root, `big${i}`), seed);
    big.push({ upath: `big${i}`, size: bigBytes, digest: digestBuffer(seed) });
  }
  const smallBuf = randomBytes(4096);
  const small: PullRequest = { upath: 'small', size: 4096, digest: digestBuffer(smallBuf) };
  writeFileSync(join(root, 'small'), smallBuf);
  execSync('sync');

  // Two owners: one sends bodies with sendfile (the default), one through buffers.
  const proc = fork(fileURLToPath(import.meta.url), ['--child', root, 'sendfile'], { stdio: 'inherit' });
  const ready = await new Promise<Ready>((r) => proc.once('message', (m) => r(m as Ready)));
  const procBuf = fork(fileURLToPath(import.meta.url), ['--child', root, 'buffered'], { stdio: 'inherit' });
  const readyBuf = await new Promise<Ready>((r) => procBuf.once('message', (m) => r(m as Ready)));
  const client = tcpBackend.client({
    secret: SECRET,
    maxConnectionsPerPeer: Number(values.conns),
    bufferBytes: Number(values['buffer-kib']) << 10,
    buffersPerPull: Number(values.buffers),
    writeMode: values['write-mode'] as WriteMode,
  });
  const total = nBig * bigBytes;
  console.log(`dir ${base}; ${nBig} x ${values.mib} MiB, conns ${values.conns}, buffer ${values['buffer-kib']} KiB x ${values.buffers}, ${values['write-mode']} writes, ${values.prefault ? 'prefaulted' : 'cold memory'}`);
  const gb = (secs: number): string => (total / secs / 1e9).toFixed(2);
  for (let r = 0; r < Number(values.rounds); r++) {
    settle(out, values.prefault ? Math.round(total * 1.5) : 0);
    const tData = await rawStream(ready.rawPort, total, false);
    const tOnread = await rawStream(ready.rawPort, total, true);
    const tFiles = await rawToFiles(ready.rawPort, nBig, bigBytes, out);
    settle(out, values.prefault ? Math.round(total * 1.5) : 0);
    const pullAll = async (address: string): Promise<number> => {
      const t0 = process.hrtime.bigint();
      await Promise.all(big.map((req, i) => client.pull(address, req, join(out, `big${i}`))));
      return Number(process.hrtime.bigint() - t0) / 1e9;
    };
    const tBuf = await pullAll(readyBuf.pullAddress);
    settle(out, values.prefault ? Math.round(total * 1.5) : 0);
    setReceiveThreadEnabled(false);
    const tNoThread = await pullAll(ready.pullAddress);
    setReceiveThreadEnabled(true);
    settle(out, values.prefault ? Math.round(total * 1.5) : 0);
    const tPull = await pullAll(ready.pullAddress);
    console.log(
      `round ${r}: raw 'data' ${gb(tData)} GB/s, raw onread ${gb(tOnread)}, raw piped to files ${gb(tFiles)}, ` +
        `pull ${gb(tPull)} GB/s = ${(tData / tPull).toFixed(2)}x raw 'data', ${(tOnread / tPull).toFixed(2)}x raw onread, ` +
        `${(tFiles / tPull).toFixed(2)}x raw to files; owner without sendfile ${gb(tBuf)} GB/s (sendfile ${(tBuf / tPull).toFixed(2)}x), ` +
        `consumer without the receive thread ${gb(tNoThread)} GB/s (thread ${(tNoThread / tPull).toFixed(2)}x)`,
    );
  }
  for (let r = 0; r < Number(values.rounds); r++) {
    settle(out, values.prefault ? nSmall * 8192 : 0);
    const lat: number[] = [];
    for (let i = 0; i < nSmall; i++) {
      const t = process.hrtime.bigint();
      await client.pull(ready.pullAddress, small, join(out, `s${i}`));
      lat.push(Number(process.hrtime.bigint() - t) / 1e6);
    }
    lat.sort((a, b) => a - b);
    if (nSmall > 0) console.log(`round ${r}: ${nSmall} x 4 KiB sequential: median ${pct(lat, 0.5).toFixed(3)} ms, p99 ${pct(lat, 0.99).toFixed(3)} ms`);
  }
  await client.close();
  proc.disconnect();
  procBuf.disconnect();
  if (!values.dir) rmSync(base, { recursive: true, force: true });
}

if (process.argv[2] === '--child') {
  await child(process.argv[3]!, process.argv[4] !== 'buffered');
} else {
  await main();
}
