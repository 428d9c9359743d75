/**
 * The data-channel heartbeat (README "Live sessions"): `{"type": "ping"}` about every second,
 * answered with `pong`. Any message from the relay counts as a sign of life; none for
 * `deadAfterMs` means the network path is gone, long before the browser's own ICE timers notice.
 */

export class Heartbeat {
  constructor({ send, onDead, intervalMs = 1000, deadAfterMs = 4500, timers = globalThis, now = () => Date.now() }) {
    Object.assign(this, { send, onDead, intervalMs, deadAfterMs, timers, now });
    this.handle = null;
    this.lastSeen = 0;
    this.dead = false;
  }

  /** Start pinging; the clock of silence starts now. Idempotent. */
  start() {
    if (this.handle !== null) return;
    this.lastSeen = this.now();
    this.dead = false;
    this.handle = this.timers.setInterval(() => this.tick(), this.intervalMs);
    this.ping();
  }

  /** Call on every message received from the relay. */
  seen() {
    this.lastSeen = this.now();
  }

  tick() {
    if (this.dead) return;
    if (this.now() - this.lastSeen >= this.deadAfterMs) {
      this.dead = true;
      this.stop();
      this.onDead();
      return;
    }
    this.ping();
  }

  ping() {
    try {
      this.send('{"type":"ping"}');
    } catch {
      // A closing channel throws; the missing pong will tell.
    }
  }

  stop() {
    if (this.handle !== null) this.timers.clearInterval(this.handle);
    this.handle = null;
  }
}
