/**
 * dyad: administration around dyad-mount.
 *
 *   dyad umount MOUNTPOINT
 *   dyad kvs serve --listen HOST:PORT --data DIR
 *   dyad namespace create|remove|list [NAME] --kvs URL
 *   dyad config [dyad-mount options] [MOUNTPOINT]
 */
import { Command } from 'commander';
import fs from 'node:fs';
import path from 'node:path';
import { unmountDyad } from '../fuse/mount.js';
import { errorLine } from '../errors.js';
import { EmbeddedKvsClient, KvsServer, adminSecretPath, openKvs, type Kvs } from '../kvs/index.js';
import { defaultKvsData, describeConfig, makeDataDir, parseHostPort, parseKvsUrl, resolveConfig, resolveKeyParams, type Flags } from '../node/config.js';
import { addDyadOptions, oneLineUsageErrors, timerFlag } from './options.js';
import { ucxInfo } from '../dtl/index.js';
import { Logger } from '../node/log.js';

function fail(err: unknown): never {
  process.stderr.write(`dyad: ${errorLine(err)}\n`);
  process.exit(1);
}

const program = oneLineUsageErrors(new Command('dyad')).description('Manage dyad-fs mounts, namespaces and the embedded KVS.');

program
  .command('umount')
  .description('unmount a dyad-fs mount; its daemon then exits')
  .argument('<mountpoint>')
  .option('-l, --lazy', 'detach now even if the mount is busy (without it, a busy mount fails with EBUSY)')
  .action((mountpoint: string, o: { lazy?: boolean }) => {
    unmountDyad(path.resolve(mountpoint), { lazy: !!o.lazy });
  });

const kvs = program.command('kvs').description('the embedded key-value store');
kvs
  .command('serve')
  .description('serve the embedded KVS in the foreground (no mount); other daemons use it with --kvs dyad://HOST:PORT')
  .option('--listen <host:port>', 'address to listen on', '127.0.0.1:7400')
  .option('--data <dir>', 'data directory (journal, admin secret, namespace secrets)', defaultKvsData())
  .option('--key-depth <n>', 'DYAD key hash levels (DYAD_KEY_DEPTH; default 3)')
  .option('--key-bins <n>', 'DYAD key bins per level (DYAD_KEY_BINS; default 1024)')
  .option('--no-fsync', 'acknowledge changes once written, before they are synced to disk (a process restart still loses nothing)')
  .option('--event-hold <ms>', 'hold change events that follow a send within this long and send them to watchers together (default 5; 0 sends each at once; waits are never held)', timerFlag('--event-hold', 'milliseconds', { zero: true }))
  .action(async (o: { listen: string; data: string; keyDepth?: string; keyBins?: string; fsync: boolean; eventHold?: number }) => {
    parseHostPort(o.listen, '--listen');
    const cfg = resolveKeyParams({ keyDepth: o.keyDepth, keyBins: o.keyBins });
    const log = new Logger('dyad-kvs');
    const i = o.listen.lastIndexOf(':');
    makeDataDir(o.data, '--data');
    const server = await KvsServer.open({
      dataDir: path.resolve(o.data),
      fsync: o.fsync,
      eventHoldMs: o.eventHold,
      keyDepth: cfg.keyDepth.value,
      keyBins: cfg.keyBins.value,
      log: (level, msg) => log[level](msg),
    });
    const bound = await server.listen(o.listen.slice(0, i).replace(/^\[|\]$/g, ''), Number(o.listen.slice(i + 1)));
    log.info(
      `serving the embedded KVS at dyad://${bound.host}:${bound.port} (data in ${path.resolve(o.data)}; change events in a burst held up to ${server.eventHoldMs} ms)`,
    );
    const stop = async () => {
      await server.close();
      process.exit(0);
    };
    process.on('SIGINT', () => void stop());
    process.on('SIGTERM', () => void stop());
  });

interface NsOpts {
  kvs: string;
  data: string;
  adminSecretFile?: string;
}

async function adminClient(o: NsOpts): Promise<Kvs> {
  // etcd has no admin secret of ours: access to etcd is the authority.
  parseKvsUrl(o.kvs, '--kvs');
  if (o.kvs.startsWith('etcd')) return openKvs(o.kvs);
  const local = adminSecretPath(o.data);
  const adminSecretFile =
    o.adminSecretFile ?? (process.env.DYAD_ADMIN_SECRET || process.env.DYAD_ADMIN_SECRET_FILE ? undefined : fs.existsSync(local) ? local : undefined);
  return EmbeddedKvsClient.connect(o.kvs, adminSecretFile ? { adminSecretFile } : {});
}

const ns = program.command('namespace').description('KVS namespaces (each has its own secret)');
const nsOptions = (c: Command) =>
  c
    .requiredOption('--kvs <url>', 'the KVS: dyad://HOST:PORT or etcd://HOST:PORT[,...]')
    .option('--data <dir>', 'the KVS data directory, to find the admin secret when on the same machine', defaultKvsData())
    .option('--admin-secret-file <file>', 'admin secret (default: DYAD_ADMIN_SECRET[_FILE], or <data>/admin.secret)');

nsOptions(ns.command('create').description('create a namespace; its secret is exported to <data>/secrets/NAME.secret').argument('<name>')).action(
  async (name: string, o: NsOpts) => {
    const c = await adminClient(o);
    try {
      await c.createNamespace(name);
      process.stdout.write(`created namespace ${name}\n`);
    } finally {
      await c.close();
    }
  },
);
nsOptions(ns.command('remove').description('remove a namespace and everything published in it').argument('<name>')).action(async (name: string, o: NsOpts) => {
  const c = await adminClient(o);
  try {
    await c.removeNamespace(name);
    process.stdout.write(`removed namespace ${name}\n`);
  } finally {
    await c.close();
  }
});
nsOptions(ns.command('list').description('list namespaces')).action(async (o: NsOpts) => {
  const c = await adminClient(o);
  try {
    for (const n of await c.listNamespaces()) process.stdout.write(`${n}\n`);
  } finally {
    await c.close();
  }
});

addDyadOptions(
  program
    .command('config')
    .description('print the effective dyad-mount configuration and where each value comes from')
    .argument('[mountpoint]'),
).action((mountpoint: string | undefined, o: Flags) => {
  const cfg = resolveConfig(mountpoint, o);
  let out = describeConfig(cfg);
  if (cfg.dtl.value === 'UCX') {
    const u = ucxInfo();
    out += u.built
      ? `\nucx            ${u.version ?? '?'}: transports ${u.transports.join(' ') || '(none)'} (UCX_TLS=${u.tls}, UCX_NET_DEVICES=${u.netDevices})`
      : `\nucx            not built: ${u.reason ?? ''}`;
  }
  process.stdout.write(`${out}\n`);
});

program.parseAsync().catch(fail);
