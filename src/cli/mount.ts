/**
 * dyad-mount: mount a DYAD managed directory and serve it.
 *
 * Runs in the foreground (what systemd, Slurm and Flux want); --background
 * starts a copy of itself and returns once the mount answers.
 */
import { Command, Option } from 'commander';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { Daemon } from '../node/daemon.js';
import { resolveConfig, type Flags } from '../node/config.js';
import { addDyadOptions, positiveNumber } from './options.js';
import { Logger, type Level } from '../node/log.js';
import { DyadError } from '../errors.js';

const program = addDyadOptions(
  new Command('dyad-mount')
    .description('Mount a DYAD managed directory (DMD) backed by node-local storage.')
    .argument('[mountpoint]', 'directory to mount over; by default its own contents are the storage (default: DYAD_PATH_CONSUMER or DYAD_PATH_PRODUCER)'),
)
  .option('--rank-lease <seconds>', 'a served embedded KVS forgets a rank not renewed for this long; every daemon renews every third of it, at most 3 s (default 10; give all daemons the same value)', positiveNumber('--rank-lease'))
  .option('--kvs-event-hold <ms>', 'a served embedded KVS holds change events that follow a send within this long, and sends them to watching daemons together (default 5; 0 sends each at once; waits are never held)', positiveNumber('--kvs-event-hold'))
  .option('--kvs-fsync', 'a served embedded KVS syncs its journal to disk before acknowledging (survives a machine crash, slower)')
  .option('--attr-timeout <seconds>', 'how long the kernel may cache names and attributes of local files', positiveNumber('--attr-timeout'), 60)
  .option('--spin <microseconds>', 'keep polling /dev/fuse this long after a request before sleeping (saves wake-ups on small files)', positiveNumber('--spin'), 0)
  .option('--background', 'start the daemon in the background and return once the mount is ready')
  .option('--log <file>', 'append log lines to this file instead of stderr')
  .addOption(new Option('--log-level <level>', 'log verbosity').choices(['error', 'warn', 'info', 'debug']).default('info'))
  .showHelpAfterError('(run dyad-mount --help for usage)');

program.parse();
const opts = program.opts<
  Flags & {
    passthrough: 'auto' | 'off';
    secretFile?: string;
    kvsFsync?: boolean;
    kvsEventHold?: number;
    rankLease?: number;
    attrTimeout: number;
    spin: number;
    background?: boolean;
    log?: string;
    logLevel: Level;
  }
>();
const mountpoint = program.args[0];

const terminal = process.stderr.isTTY ? process.stderr.write.bind(process.stderr) : undefined;

function fail(err: unknown): never {
  const msg = err instanceof DyadError ? err.message : err instanceof Error ? err.message : String(err);
  process.stderr.write(`dyad-mount: ${msg}\n`);
  // With --log the line went to the file; someone at a terminal should see it too.
  if (opts.log && terminal) terminal(`dyad-mount: ${msg}\n`);
  process.exit(1);
}

async function background(): Promise<void> {
  const args = process.argv.slice(2).filter((a) => a !== '--background');
  const logFd = opts.log ? fs.openSync(opts.log, 'a') : 'ignore';
  if (!opts.log) process.stderr.write(`dyad-mount: no --log given: the background daemon's log lines are discarded\n`);
  // Flags given to node itself (heap sizes, V8 options) hold for the daemon too.
  const child = spawn(process.execPath, [...process.execArgv, process.argv[1]!, ...args], {
    detached: true,
    stdio: ['ignore', logFd, logFd === 'ignore' ? 'pipe' : logFd, 'ipc'],
    env: { ...process.env, DYAD_MOUNT_READY_IPC: '1' },
  });
  let errText = '';
  child.stderr?.on('data', (d: Buffer) => (errText += d.toString()));
  await new Promise<void>((resolve) => {
    child.on('message', (m: { ready?: boolean }) => {
      if (m.ready) {
        process.stdout.write(`dyad-mount: ${mountpoint ?? 'DMD'} mounted (daemon pid ${child.pid})\n`);
        child.disconnect();
        child.stderr?.destroy();
        child.unref();
        resolve();
      }
    });
    child.on('exit', (code) => {
      if (!errText && opts.log) {
        // The reason went to the log file: show its last lines.
        errText = fs.readFileSync(opts.log, 'utf8').trim().split('\n').slice(-3).join('\n') + '\n';
      }
      process.stderr.write(errText || `dyad-mount: daemon exited with code ${code}\n`);
      process.exit(code || 1);
    });
  });
  process.exit(0);
}

async function foreground(): Promise<void> {
  if (opts.log) {
    // Written synchronously: the last lines before an exit (the reason for
    // it, above all) must not sit in a stream's buffer when the process ends.
    const fd = fs.openSync(opts.log, 'a');
    process.stderr.write = ((chunk: string | Uint8Array) => {
      if (typeof chunk === 'string') fs.writeSync(fd, chunk);
      else fs.writeSync(fd, chunk);
      return true;
    }) as typeof process.stderr.write;
  }
  const logger = new Logger('dyad-mount', opts.logLevel);
  const daemon = new Daemon({
    config: resolveConfig(mountpoint, opts),
    secretFile: opts.secretFile,
    kvsFsync: !!opts.kvsFsync,
    kvsEventHoldMs: opts.kvsEventHold,
    rankLeaseMs: opts.rankLease === undefined ? undefined : opts.rankLease * 1000,
    passthrough: opts.passthrough,
    ttlMs: opts.attrTimeout * 1000,
    spinUs: opts.spin,
    logger,
  });
  await daemon.start();
  let stopping = false;
  const stop = async (why: string) => {
    if (stopping) return;
    stopping = true;
    logger.info(`${why}: unmounting ${daemon.mountpoint}`);
    await daemon.stop();
    process.exit(0);
  };
  process.on('SIGINT', () => void stop('SIGINT'));
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGUSR1', () => logger.info(`requests: ${JSON.stringify(daemon.stats())}`));
  daemon.onUnmounted(() => {
    logger.info(`${daemon.mountpoint} was unmounted`);
    void daemon.stop().then(() => process.exit(0));
  });
  if (process.env.DYAD_MOUNT_READY_IPC && process.send) {
    process.send({ ready: true });
    // The starter has gone; without --log there is no one left to read stderr.
    if (!opts.log) process.stderr.write = (() => true) as typeof process.stderr.write;
  }
}

(opts.background ? background() : foreground()).catch(fail);
