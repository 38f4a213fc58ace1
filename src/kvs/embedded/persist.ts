/**
 * Opens a KVS data directory: takes its lock, replays the journal into a fresh
 * store, compacts the journal to a snapshot of the replayed state, and wires the
 * store to append to it from then on. Compacting at every start bounds the
 * journal to one run's changes on top of the live state.
 *
 * Layout of dataDir (mode 0700):
 *   kvs.journal   the journal (0600)
 *   admin.secret  the admin secret, created on first start (0600)
 *   lock          pid of the server using the directory
 */
import { constants } from 'node:fs';
import { mkdir, open, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { ConfigError, errnos } from '../../errors.js';
import { Journal, readJournal, writeSnapshot } from './journal.js';
import { adminSecretPath, loadOrCreateSecretFile } from './secrets.js';
import { KvsStore, type StoreOptions } from './store.js';

export interface PersistentStoreOptions extends StoreOptions {
  dataDir: string;
  /** fdatasync journal batches before acknowledging (default true). */
  fsync?: boolean;
  log?: (msg: string) => void;
}

export interface PersistentStore {
  store: KvsStore;
  journal: Journal;
  adminSecret: string;
  /** Flushes the journal and releases the directory. */
  close(): Promise<void>;
}

export function journalPath(dataDir: string): string {
  return join(dataDir, 'kvs.journal');
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Two servers appending to one journal would interleave records, so a data dir has one owner. */
async function lockDataDir(dataDir: string): Promise<() => Promise<void>> {
  const file = join(dataDir, 'lock');
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fh = await open(file, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600);
      await fh.writeFile(`${process.pid}\n`);
      await fh.close();
      return () => rm(file, { force: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const pid = Number((await readFile(file, 'utf8').catch(() => '')).trim());
    if (Number.isInteger(pid) && pid > 0 && pidAlive(pid)) {
      throw new ConfigError(
        `KVS data directory ${dataDir} is in use by process ${pid}${pid === process.pid ? ' (this process)' : ''}`,
        errnos.EBUSY,
      );
    }
    // The owner died without cleaning up; take over.
    await rm(file, { force: true });
  }
  throw new ConfigError(`cannot lock KVS data directory ${dataDir}`);
}

export async function openPersistentStore(opts: PersistentStoreOptions): Promise<PersistentStore> {
  const { dataDir } = opts;
  await mkdir(dataDir, { recursive: true, mode: 0o700 });
  const unlock = await lockDataDir(dataDir);
  try {
    const file = journalPath(dataDir);
    const { entries, droppedBytes } = await readJournal(file);
    if (droppedBytes > 0) opts.log?.(`KVS journal ${file}: ignored ${droppedBytes} bytes of an incomplete final write`);
    const store = new KvsStore(opts);
    for (const e of entries) store.replay(e);
    await writeSnapshot(file, store.snapshot(), opts.fsync ?? true);
    const journal = await Journal.openAppend(file, { fsync: opts.fsync ?? true });
    store.attach(journal);
    const adminSecret = await loadOrCreateSecretFile(adminSecretPath(dataDir));
    return {
      store,
      journal,
      adminSecret,
      close: async () => {
        await journal.close();
        await unlock();
      },
    };
  } catch (err) {
    await unlock();
    throw err;
  }
}
