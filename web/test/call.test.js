import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';

import { CallController, MIC_CONSTRAINTS } from '../static/js/call.js';
import { FakeApi, FakeMedia, FakeRelay, apiError, fakePeerConnectionFactory } from './fakes.js';

let api;
let media;
let relay;
let network;
let states;
let notices;

function controller(options = {}) {
  const c = new CallController({
    api,
    media,
    createPeerConnection: fakePeerConnectionFactory(relay),
    network,
    random: () => 0.5, // no jitter: exact backoff
    userAgent: 'Mozilla/5.0 Chrome/156.0',
    options,
  });
  c.on('state', (s) => states.push(s.state));
  c.on('notice', (n) => notices.push(n));
  return c;
}

async function startLive(c) {
  const started = c.start('cafe-order');
  await vi.advanceTimersByTimeAsync(50);
  expect(await started).toBe(true);
  expect(c.state).toBe('live');
  return c;
}

beforeEach(() => {
  vi.useFakeTimers();
  api = new FakeApi();
  media = new FakeMedia();
  relay = new FakeRelay();
  network = new EventTarget();
  states = [];
  notices = [];
});

afterEach(() => {
  vi.useRealTimers();
});

describe('starting a call', () => {
  it('gets the mic first, creates the session, offers with its client secret and goes live', async () => {
    const c = await startLive(controller());
    expect(media.lastConstraints).toEqual(MIC_CONSTRAINTS);
    expect(api.calls.map((x) => x.method)).toEqual(['createSession', 'offer']);
    const [, secret, sdp] = api.calls[1].args;
    expect(secret).toBe('secret-0');
    expect(sdp.startsWith('v=0')).toBe(true);
    expect(states).toEqual(['acquiring_mic', 'creating', 'connecting', 'live']);
    expect(relay.pc.config).toEqual({ iceServers: api.iceServers(0) }); // the servers of the secret used
    expect(relay.pc.channels.map((ch) => ch.label)).toEqual(['client']); // the offer carries a data section
    expect(relay.pc.transceivers[0].sender.track).toBe(media.streams[0].tracks[0]);
    expect(c.location).toBe('/v1/sessions/sess_1/webrtc/peer_1');
  });

  it('sends heartbeats on the events channel while live', async () => {
    const c = await startLive(controller());
    await vi.advanceTimersByTimeAsync(3000);
    const pings = relay.pc.events.sent.filter((m) => m.type === 'ping');
    expect(pings.length).toBeGreaterThanOrEqual(3);
    expect(c.state).toBe('live');
  });

  it.each([
    ['NotAllowedError', 'Permission denied', 'denied'],
    ['NotAllowedError', 'Permission denied by system', 'system_denied'],
    ['NotFoundError', 'Requested device not found', 'no_device'],
    ['NotReadableError', 'Could not start audio source', 'busy'],
  ])('a mic failure (%s: %s) says which and creates no session', async (name, message, kind) => {
    media.failWith = { name, message };
    const c = controller();
    let failure = null;
    c.on('state', (s) => {
      if (s.state === 'failed') failure = s;
    });
    expect(await c.start('cafe-order')).toBe(false);
    expect(c.state).toBe('failed');
    expect(failure.kind).toBe(kind);
    expect(failure.message.length).toBeGreaterThan(20);
    expect(api.calls).toEqual([]);
    expect(relay.pcs).toEqual([]);
  });

  it('without mediaDevices (an insecure page) explains https', async () => {
    const c = new CallController({ api, media: undefined, createPeerConnection: fakePeerConnectionFactory(relay), secureContext: false });
    let failure = null;
    c.on('state', (s) => {
      if (s.state === 'failed') failure = s;
    });
    await c.start('cafe-order');
    expect(failure.kind).toBe('insecure');
    expect(api.calls).toEqual([]);
  });

  it('a refused session creation frees the microphone', async () => {
    api.fail('createSession', apiError(429, 'rate_limited', { retryAfterMs: 20000 }));
    const c = controller();
    let failure = null;
    c.on('state', (s) => {
      if (s.state === 'failed') failure = s;
    });
    expect(await c.start('cafe-order')).toBe(false);
    expect(failure.message).toMatch(/20 seconds/);
    expect(media.streams[0].tracks[0].stopped).toBe(true);
  });

  it('cancelling while the browser asks for the mic creates nothing', async () => {
    let release;
    media.getUserMedia = () => new Promise((resolve) => (release = resolve));
    const c = controller();
    const started = c.start('cafe-order');
    await vi.advanceTimersByTimeAsync(0);
    await c.end();
    const stream = new (await import('./fakes.js')).FakeStream();
    release(stream);
    expect(await started).toBe(false);
    expect(stream.tracks[0].stopped).toBe(true);
    expect(api.calls).toEqual([]);
    expect(c.state).toBe('ended');
  });

  it('replaces an expired client secret transparently', async () => {
    api.fail('offer', apiError(401, 'client_secret_expired'));
    await startLive(controller());
    expect(api.calls.map((x) => x.method)).toEqual(['createSession', 'offer', 'clientSecret', 'offer']);
    expect(api.calls[3].args[1]).toBe('secret-1');
  });

  it('at capacity, waits as told and tries again, then gives up and ends the session', async () => {
    const busy = () => apiError(503, 'capacity', { retryAfterMs: 2000 });
    api.fail('offer', busy(), busy(), busy());
    const c = controller();
    const started = c.start('cafe-order');
    await vi.advanceTimersByTimeAsync(50);
    expect(notices.at(-1).message).toMatch(/busy.*2 seconds.*automatically/);
    await vi.advanceTimersByTimeAsync(5000);
    expect(await started).toBe(false);
    expect(c.state).toBe('failed');
    expect(api.count('offer')).toBe(3);
    expect(api.count('endSession')).toBe(1); // the created session is not left open
    expect(media.streams[0].tracks[0].stopped).toBe(true);
  });

  it('at capacity once, connects on the retry', async () => {
    api.fail('offer', apiError(503, 'capacity', { retryAfterMs: 1000 }));
    const c = controller();
    const started = c.start('cafe-order');
    await vi.advanceTimersByTimeAsync(1200);
    expect(await started).toBe(true);
    expect(c.state).toBe('live');
  });
});

describe('events channel', () => {
  it('assembles the transcript and tracks who is speaking', async () => {
    const c = await startLive(controller());
    const speaking = [];
    c.on('coach', (e) => speaking.push(e.speaking));
    const ch = relay.pc.events;
    ch.deliver({ type: 'session.state', status: 'live' });
    ch.deliver({ type: 'transcript.delta', speaker: 'learner', item_id: 'i1', delta: 'Hello ' });
    ch.deliver({ type: 'transcript.delta', speaker: 'learner', item_id: 'i1', delta: 'there' });
    ch.deliver({ type: 'coach.speaking', item_id: 'c1' });
    ch.deliver({ type: 'transcript.delta', speaker: 'coach', item_id: 'c1', delta: 'Hi!' });
    expect(c.transcript.ordered().map((e) => [e.speaker, e.text, e.final])).toEqual([
      ['learner', 'Hello there', false],
      ['coach', 'Hi!', false],
    ]);
    ch.deliver({ type: 'transcript.final', segment: { id: 's1', speaker: 'learner', text: 'Hello there.', start_ms: 100, end_ms: 900, final: true } });
    ch.deliver({ type: 'coach.done', item_id: 'c1' });
    expect(c.transcript.ordered()[0]).toMatchObject({ speaker: 'learner', text: 'Hello there.', final: true });
    expect(speaking).toEqual([true, false]);
    expect(c.serverStatus).toBe('live');
  });

  it('shows upstream errors in plain words and clears them when the coach is back', async () => {
    const c = await startLive(controller());
    relay.pc.events.deliver({ type: 'error', code: 'upstream_retrying', message: 'x' });
    expect(notices.at(-1)).toMatchObject({ code: 'upstream', level: 'warning' });
    expect(notices.at(-1).message).toMatch(/Reconnecting/);
    relay.pc.events.deliver({ type: 'coach.speaking', item_id: 'c2' });
    expect(notices.at(-1)).toEqual({ code: 'upstream', message: null });
    expect(c.state).toBe('live');
  });

  it('ignores malformed and unknown messages', async () => {
    const c = await startLive(controller());
    relay.pc.events.onmessage({ data: 'not json' });
    relay.pc.events.deliver({ type: 'something.new', x: 1 });
    expect(c.state).toBe('live');
  });

  it('a session the server ends (upstream failed) ends here too, with the reason', async () => {
    const c = await startLive(controller());
    let ended = null;
    c.on('state', (s) => {
      if (s.state === 'ended') ended = s;
    });
    relay.pc.events.deliver({ type: 'error', code: 'upstream_failed', message: 'x' });
    relay.pc.events.deliver({ type: 'session.state', status: 'ending' });
    expect(c.state).toBe('ended');
    expect(ended.message).toMatch(/saved/);
    expect(relay.pc.closed).toBe(true);
    expect(media.streams[0].tracks[0].stopped).toBe(true);
  });
});

describe('network drops', () => {
  it('a silent relay (no pong) is noticed, and the call reconnects to the same session', async () => {
    const c = await startLive(controller());
    const first = relay.pc;
    first.events.deliver({ type: 'transcript.final', segment: { id: 's1', speaker: 'learner', text: 'One.', start_ms: 0, end_ms: 500 } });
    api.stored = [
      { id: 's1', speaker: 'learner', text: 'One.', start_ms: 0, end_ms: 500, final: true },
      { id: 's2', speaker: 'coach', text: 'Said while you were away.', start_ms: 600, end_ms: 900, final: true },
    ];
    relay.answering = false;
    await vi.advanceTimersByTimeAsync(5000); // > deadAfterMs: reconnecting, then the new leg
    relay.answering = true;
    expect(states).toContain('reconnecting');
    await vi.advanceTimersByTimeAsync(100);
    expect(c.state).toBe('live');
    expect(first.closed).toBe(true);
    expect(relay.pcs.length).toBe(2);
    const offers = api.calls.filter((x) => x.method === 'offer');
    expect(offers.map((x) => x.args[0])).toEqual(['sess_1', 'sess_1']);
    expect(offers[1].args[1]).toBe('secret-1'); // a fresh secret, never the used one
    expect(relay.pcs[1].config).toEqual({ iceServers: api.iceServers(1) }); // and its fresh TURN credential
    // The transcript goes on: what was stored during the gap is merged in.
    expect(c.transcript.ordered().map((e) => e.text)).toEqual(['One.', 'Said while you were away.']);
  });

  it('a reconnect answered for a continuation session carries on under the new session id', async () => {
    const c = await startLive(controller());
    const continued = [];
    c.on('session-continued', (e) => continued.push(e));
    api.continueAs = 'sess_2'; // the relay holding sess_1 died: it was interrupted
    relay.pc.setConnectionState('failed');
    await vi.advanceTimersByTimeAsync(100);
    expect(c.state).toBe('live');
    const offers = api.calls.filter((x) => x.method === 'offer');
    expect(offers.map((x) => x.args[0])).toEqual(['sess_1', 'sess_1']); // offered for the old session
    expect(continued).toEqual([{ from: 'sess_1', to: 'sess_2' }]);
    expect(c.sessionId).toBe('sess_2');
    relay.pc.setConnectionState('failed'); // later reconnects are for the continuation
    await vi.advanceTimersByTimeAsync(100);
    expect(api.calls.filter((x) => x.method === 'clientSecret').at(-1).args).toEqual(['sess_2']);
    expect(api.calls.filter((x) => x.method === 'offer').at(-1).args[0]).toBe('sess_2');
    await c.end();
    expect(api.calls.at(-1)).toMatchObject({ method: 'endSession', args: ['sess_2', undefined] });
  });

  it('ICE failure and a closed channel are drops too', async () => {
    const c = await startLive(controller());
    relay.pc.setConnectionState('failed');
    await vi.advanceTimersByTimeAsync(0);
    expect(c.state).toBe('reconnecting');
    await vi.advanceTimersByTimeAsync(100);
    expect(c.state).toBe('live');
    relay.pc.events.remoteClose();
    await vi.advanceTimersByTimeAsync(0);
    expect(c.state).toBe('reconnecting');
    await vi.advanceTimersByTimeAsync(100);
    expect(c.state).toBe('live');
    expect(api.count('offer')).toBe(3);
  });

  it('the browser going offline is a drop at once', async () => {
    const c = await startLive(controller());
    network.dispatchEvent(new Event('offline'));
    await vi.advanceTimersByTimeAsync(0);
    expect(c.state).toBe('reconnecting');
  });

  it('a short ICE "disconnected" that recovers is not a drop', async () => {
    const c = await startLive(controller());
    relay.pc.setConnectionState('disconnected');
    await vi.advanceTimersByTimeAsync(1000);
    relay.pc.setConnectionState('connected');
    await vi.advanceTimersByTimeAsync(5000);
    expect(c.state).toBe('live');
    expect(api.count('offer')).toBe(1);
  });

  it('retries with growing backoff while the server cannot be reached', async () => {
    const c = await startLive(controller());
    const down = () => apiError(0, 'network');
    api.fail('clientSecret', down(), down(), down());
    relay.pc.setConnectionState('failed');
    const times = [];
    const original = api.clientSecret.bind(api);
    api.clientSecret = (id) => {
      times.push(Date.now());
      return original(id);
    };
    await vi.advanceTimersByTimeAsync(10000);
    expect(c.state).toBe('live');
    const gaps = times.slice(1).map((t, i) => t - times[i]);
    expect(gaps.length).toBe(3);
    expect(gaps[0]).toBeGreaterThanOrEqual(500);
    expect(gaps[1]).toBeGreaterThanOrEqual(1000);
    expect(gaps[2]).toBeGreaterThanOrEqual(2000);
  });

  it('stops when the server says the session ended (grace window over)', async () => {
    const c = await startLive(controller());
    api.fail('clientSecret', apiError(409, 'session_ended'));
    let ended = null;
    c.on('state', (s) => {
      if (s.state === 'ended') ended = s;
    });
    relay.pc.setConnectionState('failed');
    await vi.advanceTimersByTimeAsync(100);
    expect(c.state).toBe('ended');
    expect(ended.message).toMatch(/ended/);
    expect(media.streams[0].tracks[0].stopped).toBe(true);
  });

  it('gives up after the reconnect window, frees everything and asks the server to end', async () => {
    const c = await startLive(controller({ reconnectWindowMs: 8000 }));
    for (let i = 0; i < 20; i += 1) api.fail('clientSecret', apiError(0, 'network'));
    relay.pc.setConnectionState('failed');
    await vi.advanceTimersByTimeAsync(20000);
    expect(c.state).toBe('failed');
    expect(api.count('endSession')).toBe(1);
    expect(media.streams[0].tracks[0].stopped).toBe(true);
    expect(relay.pcs.every((pc) => pc.closed)).toBe(true);
  });

  it('an expired access token while reconnecting fails the call only if sign-in is refused', async () => {
    const c = await startLive(controller());
    api.fail('clientSecret', apiError(401, 'signed_out'));
    relay.pc.setConnectionState('failed');
    await vi.advanceTimersByTimeAsync(100);
    expect(c.state).toBe('failed');
  });
});

describe('the microphone mid-session', () => {
  it('unplugged: the learner is told; when it returns the new track is sent on the same leg', async () => {
    const c = await startLive(controller());
    media.failWith = { name: 'NotFoundError' };
    media.streams[0].tracks[0].unplug();
    expect(notices.at(-1)).toMatchObject({ code: 'mic_lost', level: 'error' });
    await vi.advanceTimersByTimeAsync(4000);
    media.failWith = null;
    media.dispatchEvent(new Event('devicechange'));
    await vi.advanceTimersByTimeAsync(10);
    const sender = relay.pc.transceivers[0].sender;
    expect(sender.track).toBe(media.streams.at(-1).tracks[0]);
    expect(notices.some((n) => n.code === 'mic_lost' && n.message === null)).toBe(true);
    expect(c.state).toBe('live');
    expect(api.count('offer')).toBe(1);
  });

  it('gone for good: the session ends cleanly after the grace time', async () => {
    const c = await startLive(controller({ micGraceMs: 10000 }));
    media.failWith = { name: 'NotAllowedError' };
    media.streams[0].tracks[0].unplug();
    await vi.advanceTimersByTimeAsync(12000);
    expect(c.state).toBe('ended');
    expect(api.count('endSession')).toBe(1);
  });
});

describe('ending', () => {
  it('End tells the relay, ends on the server and frees everything', async () => {
    const c = await startLive(controller());
    const pc = relay.pc;
    const events = pc.events;
    const session = await c.end();
    expect(session).toEqual({ id: 'sess_1', status: 'ended' });
    expect(events.sent.at(-1)).toEqual({ type: 'session.end' });
    expect(api.calls.at(-1)).toMatchObject({ method: 'endSession', args: ['sess_1', undefined] });
    expect(c.state).toBe('ended');
    expect(pc.closed).toBe(true);
    expect(media.streams[0].tracks[0].stopped).toBe(true);
    // nothing keeps running: no timers left
    expect(vi.getTimerCount()).toBe(0);
  });

  it('the session.state the relay sends while ending does not cut End short', async () => {
    const c = await startLive(controller());
    const pc = relay.pc;
    let resolveEnd;
    api.endSession = (id) => new Promise((resolve) => (resolveEnd = () => resolve({ id, status: 'ended' })));
    const ending = c.end();
    pc.events.deliver({ type: 'session.state', status: 'ending' });
    expect(c.state).toBe('ending');
    resolveEnd();
    await ending;
    expect(c.state).toBe('ended');
  });

  it('leaving the page ends the session with a keepalive request', async () => {
    const c = await startLive(controller());
    c.abandon();
    expect(api.calls.at(-1)).toMatchObject({ method: 'endSession', args: ['sess_1', { keepalive: true }] });
    expect(c.state).toBe('ended');
    expect(relay.pc.closed).toBe(true);
    expect(media.streams[0].tracks[0].stopped).toBe(true);
  });

  it('can start a new call after one ended', async () => {
    const c = await startLive(controller());
    await c.end();
    await startLive(c);
    expect(api.count('createSession')).toBe(2);
  });
});
