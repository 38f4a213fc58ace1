/**
 * Frames written during one turn of the event loop leave in one write.
 *
 * On a loopback or virtualised network each socket write costs tens of µs
 * of CPU on both ends (the sender runs the receiver's network stack and
 * wakes it). A publication that fans out to watchers, a burst of replica
 * records, and the replies to a chunk of pipelined requests all happen
 * within one turn; corking until setImmediate sends them together. The
 * check phase runs right after the poll phase that produced them, so a
 * single frame waits microseconds, and a reply queued after an event still
 * leaves after it (the order of frames on a socket is unchanged).
 */
import type { Socket } from 'node:net';

export class TurnBatcher {
  private corked = false;

  constructor(private readonly socket: Socket) {}

  write(frame: Buffer): void {
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      setImmediate(this.release);
    }
    this.socket.write(frame);
  }

  private readonly release = (): void => {
    this.corked = false;
    this.socket.uncork();
  };
}
