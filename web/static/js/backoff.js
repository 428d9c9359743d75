/**
 * Retry timing: exponential backoff with jitter, and the HTTP `Retry-After` header.
 *
 * Pure: the random source is injected, so tests get exact numbers.
 */

/** Exponential backoff: initial, initial·factor, … capped at `maxMs`, each ±`jitter` (a fraction). */
export class Backoff {
  constructor({ initialMs = 500, maxMs = 8000, factor = 2, jitter = 0.2, random = Math.random } = {}) {
    if (initialMs <= 0 || maxMs < initialMs || factor < 1 || jitter < 0 || jitter >= 1) {
      throw new RangeError('Backoff: bad parameters');
    }
    Object.assign(this, { initialMs, maxMs, factor, jitter, random });
    this.attempts = 0;
  }

  /** The delay before the next attempt, in milliseconds; each call counts one attempt. */
  next() {
    const base = Math.min(this.maxMs, this.initialMs * this.factor ** this.attempts);
    this.attempts += 1;
    const spread = base * this.jitter * (2 * this.random() - 1);
    return Math.max(0, Math.round(base + spread));
  }

  reset() {
    this.attempts = 0;
  }
}

/**
 * Milliseconds to wait from a `Retry-After` value: delta-seconds or an HTTP date.
 * Missing or unreadable: `fallbackMs`. Never negative, never more than `maxMs`.
 */
export function retryAfterMs(value, { now = Date.now(), fallbackMs = 5000, maxMs = 120000 } = {}) {
  if (value === null || value === undefined || String(value).trim() === '') return fallbackMs;
  const text = String(value).trim();
  let ms;
  if (/^\d+$/.test(text)) {
    ms = Number(text) * 1000;
  } else {
    const when = Date.parse(text);
    if (Number.isNaN(when)) return fallbackMs;
    ms = when - now;
  }
  return Math.min(maxMs, Math.max(0, ms));
}

/** A promise that resolves after `ms`, using the given timer functions (tests inject fake ones). */
export function sleep(ms, timers = globalThis) {
  return new Promise((resolve) => timers.setTimeout(resolve, ms));
}
