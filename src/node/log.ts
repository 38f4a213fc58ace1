/**
 * One-line logs on stderr: "<time> dyad-mount[<pid>] <level>: <message>".
 * A daemon under systemd or Slurm gets its lines collected from stderr, so
 * there is no log file unless --log asks for one.
 */
export type Level = 'error' | 'warn' | 'info' | 'debug';
const order: Record<Level, number> = { error: 0, warn: 1, info: 2, debug: 3 };

export class Logger {
  constructor(private readonly name: string, private level: Level = 'info') {}

  setLevel(level: Level): void {
    this.level = level;
  }

  enabled(level: Level): boolean {
    return order[level] <= order[this.level];
  }

  log(level: Level, msg: string): void {
    if (!this.enabled(level)) return;
    process.stderr.write(`${new Date().toISOString()} ${this.name}[${process.pid}] ${level}: ${msg}\n`);
  }

  error(msg: string): void {
    this.log('error', msg);
  }
  warn(msg: string): void {
    this.log('warn', msg);
  }
  info(msg: string): void {
    this.log('info', msg);
  }
  debug(msg: string): void {
    this.log('debug', msg);
  }
}
