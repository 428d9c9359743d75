/**
 * The states of one call in the browser and the moves between them. Pure: no timers, no I/O.
 *
 *   idle -> acquiring_mic -> creating -> connecting -> live <-> reconnecting -> ending -> ended
 *                 |              |            |          |            |
 *                 +--------------+------------+----------+------------+----> failed
 *
 * `ended` and `failed` are final for the call; `reset` goes back to `idle` for the next one.
 */

export const STATES = Object.freeze([
  'idle',
  'acquiring_mic',
  'creating',
  'connecting',
  'live',
  'reconnecting',
  'ending',
  'ended',
  'failed',
]);

const MOVES = {
  idle: { start: 'acquiring_mic' },
  acquiring_mic: { mic_ready: 'creating', fail: 'failed', cancel: 'ended' },
  creating: { created: 'connecting', fail: 'failed', cancel: 'ended' },
  connecting: { connected: 'live', lost: 'reconnecting', end: 'ending', server_ended: 'ended', fail: 'failed' },
  live: { lost: 'reconnecting', end: 'ending', server_ended: 'ended', fail: 'failed' },
  reconnecting: { connected: 'live', end: 'ending', server_ended: 'ended', fail: 'failed' },
  ending: { ended: 'ended', server_ended: 'ended', fail: 'failed' },
  ended: { reset: 'idle' },
  failed: { reset: 'idle' },
};

/** The state after `event` in `state`, or null when the event does not apply there. */
export function transition(state, event) {
  return MOVES[state]?.[event] ?? null;
}

/** States in which a call holds resources (mic, peer connection, a server session). */
export function isActive(state) {
  return state !== 'idle' && state !== 'ended' && state !== 'failed';
}

/** States in which the server may hold a live session for this call. */
export function hasServerSession(state) {
  return state === 'connecting' || state === 'live' || state === 'reconnecting' || state === 'ending';
}

/** A small holder of the current state that tells listeners about every move. */
export class CallMachine {
  constructor(onChange = () => {}) {
    this.state = 'idle';
    this.onChange = onChange;
  }

  /** Apply `event`; returns true if the state moved, false if the event does not apply now. */
  fire(event, detail = {}) {
    const next = transition(this.state, event);
    if (next === null) return false;
    const previous = this.state;
    this.state = next;
    this.onChange({ state: next, previous, event, ...detail });
    return true;
  }

  can(event) {
    return transition(this.state, event) !== null;
  }
}
