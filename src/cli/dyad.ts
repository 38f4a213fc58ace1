/**
 * dyad: administration commands around dyad-mount.
 */
import { Command } from 'commander';
import { unmount } from '../fuse/mount.js';
import { DyadError } from '../errors.js';
import path from 'node:path';

function fail(err: unknown): never {
  const msg = err instanceof Error ? err.message : String(err);
  process.stderr.write(`dyad: ${msg}\n`);
  process.exit(err instanceof DyadError && err.errno ? 1 : 1);
}

const program = new Command('dyad').description('Manage dyad-fs mounts, namespaces and the embedded KVS.');

program
  .command('umount')
  .description('unmount a dyad-fs mount; its daemon then exits')
  .argument('<mountpoint>')
  .option('-l, --lazy', 'detach now even if the mount is busy')
  .action((mountpoint: string, o: { lazy?: boolean }) => {
    try {
      unmount(path.resolve(mountpoint), { lazy: !!o.lazy });
    } catch (err) {
      fail(err);
    }
  });

program.parseAsync().catch(fail);
