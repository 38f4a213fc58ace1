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
import { addDyadOptions, oneLineUsageErrors, positiveNumber, timerFlag } from './options.js';
import { Logger, type Level } from '../node/log.js';
import { errorLine, pathError } from '../errors.js';

const program = addDyadOptions(
  oneLineUsageErrors(new Command('dyad-mount'))
    .description('Mount a DYAD managed directory (DMD) backed by node-local storage.')
    .argument('[mountpoint]', 'directory to mount over; by default its own contents are the storage (default: DYAD_PATH_CONSUMER or DYAD_PATH_PRODUCER)'),
)
  .option('--rank-lease <seconds>', 'a served embedded KVS forgets a rank not renewed for this long; every daemon renews every third of it, at most 3 s (default 10; give all daemons the same value)', timerFlag('--rank-lease', 'seconds', { zero: false }))
  .option('--kvs-event-hold <ms>', 'a served embedded KVS holds change events that follow a send within this long, and sends them to watching daemons together (default 5; 0 sends each at once; waits are never held)', timerFlag('--kvs-event-hold', 'milliseconds', { zero: true }))
  .option('--kvs-fsync', 'a served embedded KVS syncs its journal to disk before acknowledging (survives a machine crash, slower)')
  .option('--attr-timeout <seconds>', 'how long the kernel may cache names and attributes of local files', positiveNumber('--attr-timeout'), 60)
  .option('--spin <microseconds>', 'keep polling /dev/fuse this long after a request before sleeping (saves wake-ups on small files)', positiveNumber('--spin', 0xffffffff), 0)
  .option('--kernel-permissions', 'let the kernel check permissions (default_permissions): a root daemon otherwise checks them itself, acting as the caller in storage, which spares a request per file created')
  .option('--background', 'start the daemon in the background and return once the mount is ready')
  .option('--log <file>', 'append log lines to this file instead of stderr')
  .addOption(new Option('--log-level <level>', 'log verbosity').choices(['error', 'warn', 'info', 'debug']).default('info'));

program.parse();
const opts = program.opts<
  Flags & {
    passthrough: 'auto' | 'off';
    secretFile?: string;
    kvsFsync?: boolean;
    /** Milliseconds (timerFlag). */
    kvsEventHold?: number;
    /** Milliseconds (timerFlag), given in seconds. */
    rankLease?: number;
    attrTimeout: number;
    spin: number;
    kernelPermissions?: boolean;
    background?: boolean;
    log?: string;
    logLevel: Level;
  }
>();
const mountpoint = program.args[0];

const terminal = process.stderr.isTTY ? process.stderr.write.bind(process.stderr) : undefined;
/** Set once stderr goes to the --log file. */
let logging = false;

function fail(err: unknown): never {
  const line = `dyad-mount: ${errorLine(err)}\n`;
  process.stderr.write(line);
  // With --log the line went to the file; someone at a terminal should see it too.
  if (logging && terminal) terminal(line);
  process.exit(1);
}

function openLog(file: string): number {
  try {
    return fs.openSync(file, 'a');
  } catch (err) {
    throw pathError('--log', file, 'cannot open', err);
  }
}

/** What `file` gained past offset `start` (its last 64 KiB at most). */
function logTail(file: string, start: number): string {
  const fd = fs.openSync(file, 'r');
  try {
    const end = fs.fstatSync(fd).size;
    const from = Math.max(start, end - 65536);
    const buf = Buffer.alloc(Math.max(0, end - from));
    fs.readSync(fd, buf, 0, buf.length, from);
    return buf.toString('utf8');
  } finally {
    fs.closeSync(fd);
  }
}

async function background(): Promise<void> {
  const args = process.argv.slice(2).filter((a) => a !== '--background');
  const logFd = opts.log ? openLog(opts.log) : 'ignore';
  // The log may hold earlier runs: only what this daemon appends is news.
  const logStart = logFd === 'ignore' ? 0 : fs.fstatSync(logFd).size;
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
        // The reason went to the log file: show the daemon's one-line reason,
        // or, if it died without giving one, the last lines it wrote.
        const lines = logTail(opts.log, logStart).trim().split('\n');
        errText = `${[...lines].reverse().find((l) => l.startsWith('dyad-mount: ')) ?? lines.slice(-3).join('\n')}\n`;
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
    const fd = openLog(opts.log);
    process.stderr.write = ((chunk: string | Uint8Array) => {
      if (typeof chunk === 'string') fs.writeSync(fd, chunk);
      else fs.writeSync(fd, chunk);
      return true;
    }) as typeof process.stderr.write;
    logging = true;
  }
  const logger = new Logger('dyad-mount', opts.logLevel);
  const daemon = new Daemon({
    config: resolveConfig(mountpoint, opts),
    secretFile: opts.secretFile,
    kvsFsync: !!opts.kvsFsync,
    kvsEventHoldMs: opts.kvsEventHold,
    rankLeaseMs: opts.rankLease,
    passthrough: opts.passthrough,
    ttlMs: opts.attrTimeout * 1000,
    spinUs: opts.spin,
    kernelPermissions: !!opts.kernelPermissions,
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
