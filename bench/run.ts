/**
 * npm run bench -- <name> [options]: runs one benchmark and prints each
 * figure beside its baseline from the same run, with the ratio.
 */
const name = process.argv[2];
const benches: Record<string, () => Promise<{ main(args: string[]): Promise<void> }>> = {
  fuse: () => import('./fuse.js'),
  transfer: () => import('./transfer.js'),
  kvs: () => import('./kvs.js'),
  scale: () => import('./scale.js'),
  dl: () => import('./dl.js'),
};
if (!name || !benches[name]) {
  process.stderr.write(`usage: npm run bench -- <${Object.keys(benches).join('|')}> [options]\n`);
  process.exit(2);
}
const mod = await benches[name]!();
await mod.main(process.argv.slice(3));
