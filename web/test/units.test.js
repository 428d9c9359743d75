import { describe, expect, it, vi } from 'vitest';

import { ApiError } from '../static/js/api.js';
import { STORAGE_KEY, TokenStore } from '../static/js/auth.js';
import { Backoff, retryAfterMs } from '../static/js/backoff.js';
import { h } from '../static/js/dom.js';
import { clock, duration, overallScore } from '../static/js/format.js';
import { Heartbeat } from '../static/js/heartbeat.js';
import { CallMachine, STATES, isActive, transition } from '../static/js/machine.js';
import { levelPercent, rms } from '../static/js/meter.js';
import { apiErrorMessage, browserName, eventErrorMessage, micErrorMessage, statusLabel } from '../static/js/messages.js';
import { activeSegment } from '../static/js/player.js';
import { parseRoute, sessionHref } from '../static/js/router.js';
import { Transcript } from '../static/js/transcript.js';

describe('state machine', () => {
  it('follows the happy path and the reconnect loop', () => {
    const path = ['start', 'mic_ready', 'created', 'connected', 'lost', 'connected', 'end', 'ended'];
    let state = 'idle';
    const seen = [];
    for (const event of path) {
      state = transition(state, event);
      seen.push(state);
    }
    expect(seen).toEqual(['acquiring_mic', 'creating', 'connecting', 'live', 'reconnecting', 'live', 'ending', 'ended']);
  });

  it('refuses moves that make no sense', () => {
    expect(transition('idle', 'connected')).toBeNull();
    expect(transition('ended', 'lost')).toBeNull();
    expect(transition('acquiring_mic', 'lost')).toBeNull();
    const m = new CallMachine();
    expect(m.fire('end')).toBe(false);
    expect(m.state).toBe('idle');
  });

  it('every state can fail or finish, and final states only reset', () => {
    for (const s of STATES) {
      if (s === 'idle') continue;
      if (s === 'ended' || s === 'failed') expect(transition(s, 'reset')).toBe('idle');
      else expect(transition(s, 'fail') ?? transition(s, 'cancel')).not.toBeNull();
    }
    expect(isActive('reconnecting')).toBe(true);
    expect(isActive('ended')).toBe(false);
  });

  it('tells listeners about each move', () => {
    const changes = [];
    const m = new CallMachine((c) => changes.push(c));
    m.fire('start', { topicId: 't' });
    expect(changes).toEqual([{ state: 'acquiring_mic', previous: 'idle', event: 'start', topicId: 't' }]);
  });
});

describe('backoff', () => {
  it('doubles up to the cap, with jitter within bounds', () => {
    const b = new Backoff({ initialMs: 500, maxMs: 4000, jitter: 0, random: () => 0.5 });
    expect([b.next(), b.next(), b.next(), b.next(), b.next()]).toEqual([500, 1000, 2000, 4000, 4000]);
    b.reset();
    expect(b.next()).toBe(500);
    const low = new Backoff({ initialMs: 1000, jitter: 0.2, random: () => 0 });
    const high = new Backoff({ initialMs: 1000, jitter: 0.2, random: () => 0.999999 });
    expect(low.next()).toBe(800);
    expect(high.next()).toBe(1200);
  });

  it('rejects nonsense parameters', () => {
    expect(() => new Backoff({ initialMs: 0 })).toThrow(RangeError);
  });

  it('reads Retry-After as seconds or a date', () => {
    expect(retryAfterMs('5')).toBe(5000);
    expect(retryAfterMs(null, { fallbackMs: 1234 })).toBe(1234);
    expect(retryAfterMs('soon', { fallbackMs: 99 })).toBe(99);
    const now = Date.parse('2026-01-01T00:00:00Z');
    expect(retryAfterMs('Thu, 01 Jan 2026 00:00:30 GMT', { now })).toBe(30000);
    expect(retryAfterMs('99999')).toBe(120000);
  });
});

describe('heartbeat', () => {
  it('pings every interval and calls it dead after silence', () => {
    vi.useFakeTimers();
    const sent = [];
    const onDead = vi.fn();
    const hb = new Heartbeat({ send: (m) => sent.push(m), onDead, intervalMs: 1000, deadAfterMs: 3000 });
    hb.start();
    vi.advanceTimersByTime(2000);
    hb.seen();
    vi.advanceTimersByTime(2000);
    expect(onDead).not.toHaveBeenCalled();
    vi.advanceTimersByTime(1500);
    expect(onDead).toHaveBeenCalledTimes(1);
    expect(sent.length).toBeGreaterThanOrEqual(4);
    expect(JSON.parse(sent[0])).toEqual({ type: 'ping' });
    vi.advanceTimersByTime(10000);
    expect(onDead).toHaveBeenCalledTimes(1); // stopped itself
    vi.useRealTimers();
  });

  it('a send that throws (channel closing) does not break it', () => {
    vi.useFakeTimers();
    const hb = new Heartbeat({ send: () => { throw new Error('closed'); }, onDead: () => {} });
    expect(() => hb.start()).not.toThrow();
    hb.stop();
    vi.useRealTimers();
  });
});

describe('transcript assembly', () => {
  it('streams partials and replaces them with finals (by item id, else by speaker)', () => {
    const t = new Transcript();
    t.applyDelta({ speaker: 'learner', item_id: 'a', delta: 'I would ' });
    t.applyDelta({ speaker: 'learner', item_id: 'a', delta: 'like tea' });
    t.applyDelta({ speaker: 'coach', item_id: 'b', delta: 'Sure' });
    expect(t.ordered().map((e) => [e.speaker, e.text, e.final])).toEqual([
      ['learner', 'I would like tea', false],
      ['coach', 'Sure', false],
    ]);
    t.applyFinal({ id: '2', speaker: 'coach', text: 'Sure, here it is.', start_ms: 3000, end_ms: 4000 }, 'b');
    t.applyFinal({ id: '1', speaker: 'learner', text: 'I would like tea.', start_ms: 500, end_ms: 2000 });
    expect(t.ordered().map((e) => [e.speaker, e.text, e.final])).toEqual([
      ['learner', 'I would like tea.', true],
      ['coach', 'Sure, here it is.', true],
    ]);
    expect(t.entries.length).toBe(2);
  });

  it('keeps the learner first while both are still partial, even if the coach started streaming first', () => {
    const t = new Transcript();
    t.applyDelta({ speaker: 'coach', item_id: 'c', delta: 'Hello' });
    t.applyDelta({ speaker: 'learner', item_id: 'l', delta: 'Hi' });
    expect(t.ordered().map((e) => e.speaker)).toEqual(['learner', 'coach']);
  });

  it('ignores a final it already has, and merges the stored transcript after a reconnect', () => {
    const t = new Transcript();
    const seg = { id: '1', speaker: 'learner', text: 'One', start_ms: 0, end_ms: 1 };
    t.applyFinal(seg);
    t.applyFinal(seg);
    t.applyDelta({ speaker: 'coach', item_id: 'x', delta: 'Tw' });
    t.markPartialsInterrupted();
    expect(t.ordered()[1].interrupted).toBe(true);
    t.mergeStored([seg, { id: '2', speaker: 'coach', text: 'Two', start_ms: 5, end_ms: 9, final: true }]);
    expect(t.ordered().map((e) => [e.text, e.final, e.interrupted])).toEqual([
      ['One', true, false],
      ['Two', true, false],
    ]);
  });

  it('ignores malformed events and notifies listeners of changes', () => {
    const t = new Transcript();
    const seen = vi.fn();
    t.onChange(seen);
    t.applyDelta({ speaker: 'coach', delta: 'no item' });
    t.applyFinal(null);
    expect(seen).not.toHaveBeenCalled();
    t.applyDelta({ speaker: 'coach', item_id: 'i', delta: 'x' });
    expect(seen).toHaveBeenCalledTimes(1);
    expect(t.hasFinal('coach')).toBe(false);
  });
});

describe('messages', () => {
  it('names each microphone failure and how to fix it in this browser', () => {
    expect(micErrorMessage({ name: 'NotAllowedError', message: '' }, 'chrome')).toMatchObject({ kind: 'denied' });
    expect(micErrorMessage({ name: 'NotAllowedError', message: '' }, 'chrome').message).toMatch(/address bar.*Allow/);
    expect(micErrorMessage({ name: 'NotAllowedError', message: '' }, 'firefox').message).toMatch(/microphone icon/);
    expect(micErrorMessage({ name: 'NotAllowedError', message: 'Permission denied by system' }).kind).toBe('system_denied');
    expect(micErrorMessage({ name: 'NotFoundError' }).kind).toBe('no_device');
    expect(micErrorMessage({ name: 'OverconstrainedError' }).kind).toBe('no_device');
    expect(micErrorMessage({ name: 'NotReadableError' }).kind).toBe('busy');
    expect(micErrorMessage({ name: 'NotReadableError' }).message).toMatch(/Another app/);
    expect(micErrorMessage({ name: 'Weird' }).kind).toBe('unknown');
  });

  it('recognises browsers', () => {
    expect(browserName('Mozilla/5.0 (X11) AppleWebKit Chrome/156.0 Safari/537.36')).toBe('chrome');
    expect(browserName('Mozilla/5.0 Chrome/1 Safari/1 Edg/1')).toBe('edge');
    expect(browserName('Mozilla/5.0 Gecko/20100101 Firefox/140.0')).toBe('firefox');
    expect(browserName('Mozilla/5.0 (Macintosh) Version/18 Safari/605')).toBe('safari');
  });

  it('turns API errors into plain words with what to do', () => {
    const e = (status, code, extra = {}) => new ApiError({ status, code, ...extra });
    expect(apiErrorMessage(e(503, 'capacity', { retryAfterMs: 5000 }))).toBe('Parley is busy right now. Try again in 5 seconds.');
    expect(apiErrorMessage(e(0, 'network'))).toMatch(/internet connection/);
    expect(apiErrorMessage(e(401, 'invalid_credentials'), 'signin')).toBe('The email or password is wrong.');
    expect(apiErrorMessage(e(409, 'email_taken'), 'signup')).toMatch(/Sign in instead/);
    expect(apiErrorMessage(e(422, 'invalid_request', { field: 'password' }), 'signup')).toMatch(/10 characters/);
    expect(apiErrorMessage(e(409, 'session_not_finalized'), 'publish')).toMatch(/still being saved/);
    expect(apiErrorMessage(e(405, 'method_not_allowed'), 'delete')).toMatch(/can't delete/);
    expect(apiErrorMessage(e(401, 'unauthorized'))).toMatch(/Sign in again/);
    expect(apiErrorMessage(e(500, 'internal_error'))).toMatch(/its side/);
    expect(apiErrorMessage(new Error('x'))).toMatch(/try again/);
  });

  it('turns live error events into plain words', () => {
    expect(eventErrorMessage({ code: 'upstream_retrying', message: 'x' })).toMatch(/Reconnecting/);
    expect(eventErrorMessage({ code: 'upstream_unavailable' })).toMatch(/saved/);
    expect(eventErrorMessage({ code: 'new_code', message: 'Server says hi.' })).toBe('Server says hi.');
    expect(statusLabel('processing_failed')).toBe('Processing failed');
    expect(statusLabel('unknown_state')).toBe('unknown_state');
  });
});

describe('token store', () => {
  it('keeps the token in sessionStorage, not localStorage, and forgets it on sign-out', () => {
    const store = new TokenStore({ storage: sessionStorage });
    store.save({ access_token: 'abc', expires_in: 60 }, { email: 'a@b.c', userId: 'u' });
    expect(JSON.parse(sessionStorage.getItem(STORAGE_KEY)).token).toBe('abc');
    expect(localStorage.length).toBe(0);
    expect(store.token).toBe('abc');
    expect(store.expired()).toBe(false);
    expect(store.expired(61000)).toBe(true);
    store.clear();
    expect(store.token).toBeNull();
    expect(sessionStorage.getItem(STORAGE_KEY)).toBeNull();
  });

  it('falls back to memory without storage, and survives garbage in storage', () => {
    const store = new TokenStore({ storage: null });
    store.save({ access_token: 'm', expires_in: 10 }, {});
    expect(store.token).toBe('m');
    sessionStorage.setItem(STORAGE_KEY, '{not json');
    expect(new TokenStore({ storage: sessionStorage }).token).toBeNull();
    sessionStorage.clear();
  });
});

describe('small helpers', () => {
  it('formats times', () => {
    expect(clock(65000)).toBe('1:05');
    expect(clock(3725000)).toBe('1:02:05');
    expect(duration(45000)).toBe('45 s');
    expect(duration(185000)).toBe('3 min 05 s');
    expect(duration(null)).toBe('—');
    expect(overallScore({ status: 'done', scores: { a: 80, b: 60 } })).toBe(70);
    expect(overallScore({ status: 'pending' })).toBeNull();
  });

  it('routes on the hash, with no secrets in it', () => {
    expect(parseRoute('')).toEqual({ name: 'home' });
    expect(parseRoute('#/sessions/sess_1')).toEqual({ name: 'session', id: 'sess_1' });
    expect(parseRoute('#/history')).toEqual({ name: 'history' });
    expect(parseRoute('#main')).toBeNull();
    expect(parseRoute('#/nope/x/y')).toEqual({ name: 'notfound' });
    expect(sessionHref('a b')).toBe('#/sessions/a%20b');
  });

  it('finds the segment being heard', () => {
    const segs = [
      { start_ms: 1000, end_ms: 3000 },
      { start_ms: 4000, end_ms: 9000 },
    ];
    expect(activeSegment(segs, 500)).toBe(-1);
    expect(activeSegment(segs, 2000)).toBe(0);
    expect(activeSegment(segs, 3500)).toBe(0);
    expect(activeSegment(segs, 4000)).toBe(1);
    expect(activeSegment(segs, 20000)).toBe(-1);
  });

  it('measures the mic level', () => {
    expect(rms(new Float32Array([0.5, -0.5]))).toBeCloseTo(0.5);
    expect(levelPercent(0)).toBe(0);
    expect(levelPercent(1)).toBe(100);
    expect(levelPercent(0.001)).toBe(0);
    expect(levelPercent(0.1)).toBe(67);
  });

  it('puts text in as text, never as markup', () => {
    const el = h('p', { text: '<img src=x onerror=alert(1)>' });
    expect(el.querySelector('img')).toBeNull();
    const el2 = h('div', {}, '<b>bold</b>', null, false);
    expect(el2.innerHTML).toBe('&lt;b&gt;bold&lt;/b&gt;');
  });
});
