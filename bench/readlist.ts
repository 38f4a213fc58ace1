/**
 * Reader for bench/scale.ts, run as its own process per test host: reads
 * every small file listed in argv[2] (timing each open-to-close) and every
 * big file listed in argv[3] (timing the whole), and prints a JSON summary.
 */
import fs from 'node:fs';

const [smallList, bigList] = process.argv.slice(2) as [string, string];
const lines = (f: string) => fs.readFileSync(f, 'utf8').split('\n').filter(Boolean);
const buf = Buffer.allocUnsafe(1 << 20);

const lat: number[] = [];
for (const p of lines(smallList)) {
  const t0 = process.hrtime.bigint();
  const fd = fs.openSync(p, 'r');
  while (fs.readSync(fd, buf, 0, buf.length, null) > 0);
  fs.closeSync(fd);
  lat.push(Number(process.hrtime.bigint() - t0) / 1e6);
}
let bytes = 0;
const t0 = process.hrtime.bigint();
for (const p of lines(bigList)) {
  const fd = fs.openSync(p, 'r');
  let n: number;
  while ((n = fs.readSync(fd, buf, 0, buf.length, null)) > 0) bytes += n;
  fs.closeSync(fd);
}
const s = Number(process.hrtime.bigint() - t0) / 1e9;
lat.sort((a, b) => a - b);
console.log(
  JSON.stringify({
    smallMedianMs: lat.length ? lat[lat.length >> 1] : 0,
    smallP99Ms: lat.length ? lat[Math.min(lat.length - 1, Math.floor(lat.length * 0.99))] : 0,
    bigGBps: s > 0 ? bytes / s / 1e9 : 0,
  }),
);
