/**
 * A mount served by this test process, for tests that look inside the
 * daemon (pending requests, node counts, intent). Only child processes may
 * touch such a mount: a synchronous call from this process would wait for
 * the very event loop that has to answer it.
 */
import fs from 'node:fs';
import path from 'node:path';
import { FuseServer } from '../../src/fuse/server.js';
import { Storage } from '../../src/dmd/storage.js';
import type { MirrorFs, MirrorOptions } from '../../src/dmd/mirror.js';
import { tmpdir } from './mount.js';

interface Tap {
  teardown(fn: () => unknown): void;
}

export interface InProcessMount<F extends MirrorFs> {
  mnt: string;
  storage: string;
  fs: F;
  server: FuseServer;
}

export async function serveInProcess<F extends MirrorFs>(
  t: Tap,
  make: (storage: Storage, opts: MirrorOptions) => F,
  opts: MirrorOptions = {},
): Promise<InProcessMount<F>> {
  const base = tmpdir(t);
  const mnt = path.join(base, 'mnt');
  const storageDir = path.join(base, 'storage');
  fs.mkdirSync(mnt);
  fs.mkdirSync(storageDir);
  const storage = Storage.open(storageDir);
  const fsys = make(storage, { passthrough: true, ...opts });
  const server = new FuseServer(mnt, fsys, { passthrough: opts.passthrough ?? true });
  await server.start((s) => fsys.attach(s));
  t.teardown(async () => {
    await server.stop();
    storage.close();
  });
  return { mnt, storage: storageDir, fs: fsys, server };
}
