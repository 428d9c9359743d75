/**
 * Fakes of what the browser and the server provide, just enough for the call controller:
 * a microphone, RTCPeerConnection + RTCDataChannel (with a relay that answers pings), the Api.
 */

import { ApiError } from '../static/js/api.js';

export class FakeTrack {
  constructor(kind = 'audio') {
    this.kind = kind;
    this.readyState = 'live';
    this.onended = null;
    this.onmute = null;
    this.onunmute = null;
    this.stopped = false;
  }

  stop() {
    this.stopped = true;
    this.readyState = 'ended';
  }

  /** The device went away: the browser ends the track and fires `ended`. */
  unplug() {
    this.readyState = 'ended';
    this.onended?.();
  }
}

export class FakeStream {
  constructor() {
    this.tracks = [new FakeTrack()];
  }

  getTracks() {
    return this.tracks;
  }

  getAudioTracks() {
    return this.tracks;
  }
}

export class FakeMedia extends EventTarget {
  constructor() {
    super();
    this.calls = 0;
    this.failWith = null; // a DOMException-like {name, message} to reject with
    this.streams = [];
  }

  async getUserMedia(constraints) {
    this.calls += 1;
    this.lastConstraints = constraints;
    if (this.failWith) throw Object.assign(new Error(this.failWith.message ?? ''), { name: this.failWith.name });
    const stream = new FakeStream();
    this.streams.push(stream);
    return stream;
  }
}

export class FakeChannel {
  constructor(label, relay = null) {
    this.label = label;
    this.readyState = 'connecting';
    this.sent = [];
    this.relay = relay;
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
  }

  open() {
    this.readyState = 'open';
    this.onopen?.();
  }

  send(text) {
    if (this.readyState !== 'open') throw new Error('InvalidStateError');
    this.sent.push(JSON.parse(text));
    if (this.relay && JSON.parse(text).type === 'ping' && this.relay.answering) {
      queueMicrotask(() => this.deliver({ type: 'pong' }));
    }
  }

  deliver(event) {
    if (this.readyState === 'open') this.onmessage?.({ data: JSON.stringify(event) });
  }

  close() {
    this.readyState = 'closed';
  }

  /** The far end closed it (the relay dropped the peer). */
  remoteClose() {
    this.readyState = 'closed';
    this.onclose?.();
  }
}

/** The relay side of every fake peer connection: answers pings until told to go silent. */
export class FakeRelay {
  constructor() {
    this.answering = true;
    this.pcs = [];
    this.autoOpen = true;
  }

  get pc() {
    return this.pcs[this.pcs.length - 1];
  }
}

export function fakePeerConnectionFactory(relay) {
  return (config) => {
    const pc = new FakePeerConnection(config, relay);
    relay.pcs.push(pc);
    return pc;
  };
}

export class FakePeerConnection {
  constructor(config, relay) {
    this.config = config;
    this.relay = relay;
    this.transceivers = [];
    this.channels = [];
    this.connectionState = 'new';
    this.iceGatheringState = 'new';
    this.localDescription = null;
    this.remoteDescription = null;
    this.closed = false;
    this.events = null;
    this.listeners = new Map();
  }

  addEventListener(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(fn);
  }

  removeEventListener(type, fn) {
    this.listeners.get(type)?.delete(fn);
  }

  addTransceiver(trackOrKind, init) {
    const sender = {
      track: typeof trackOrKind === 'string' ? null : trackOrKind,
      async replaceTrack(track) {
        this.track = track;
      },
    };
    this.transceivers.push({ sender, init });
  }

  getTransceivers() {
    return this.transceivers;
  }

  createDataChannel(label) {
    const channel = new FakeChannel(label);
    this.channels.push(channel);
    return channel;
  }

  async createOffer() {
    return { type: 'offer', sdp: 'v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n' };
  }

  async setLocalDescription(desc) {
    this.localDescription = desc;
    this.iceGatheringState = 'gathering';
    setTimeout(() => {
      this.iceGatheringState = 'complete';
      for (const fn of this.listeners.get('icegatheringstatechange') ?? []) fn();
    }, 5);
  }

  async setRemoteDescription(desc) {
    this.remoteDescription = desc;
    if (!this.relay.autoOpen) return;
    setTimeout(() => {
      if (this.closed) return;
      this.connectionState = 'connected';
      this.onconnectionstatechange?.();
      this.events = new FakeChannel('events', this.relay);
      this.ondatachannel?.({ channel: this.events });
      this.events.open();
      this.ontrack?.({ track: new FakeTrack(), streams: [new FakeStream()] });
    }, 10);
  }

  setConnectionState(state) {
    this.connectionState = state;
    this.onconnectionstatechange?.();
  }

  close() {
    this.closed = true;
    this.connectionState = 'closed';
  }
}

/** The server, as the controller sees it through Api. Each method can be scripted to fail. */
export class FakeApi {
  constructor() {
    this.calls = [];
    this.failures = {}; // method -> array of errors to throw, one per call (then succeed)
    this.secrets = 0;
    this.stored = [];
  }

  fail(method, ...errors) {
    this.failures[method] = [...(this.failures[method] ?? []), ...errors];
  }

  record(method, args) {
    this.calls.push({ method, args });
    const queue = this.failures[method];
    if (queue && queue.length) throw queue.shift();
  }

  count(method) {
    return this.calls.filter((c) => c.method === method).length;
  }

  async createSession(topicId) {
    this.record('createSession', [topicId]);
    return {
      session: { id: 'sess_1', topic_id: topicId, status: 'created' },
      client_secret: { value: 'secret-0', expires_at: 'x', ice_servers: this.iceServers(0) },
    };
  }

  async clientSecret(sessionId) {
    this.record('clientSecret', [sessionId]);
    this.secrets += 1;
    return { value: `secret-${this.secrets}`, expires_at: 'x', ice_servers: this.iceServers(this.secrets) };
  }

  /** What the relay hands out with secret `n`: STUN, and TURN with a credential of its own. */
  iceServers(n) {
    return [
      { urls: 'stun:stun.example.org:3478' },
      { urls: ['turn:turn.example.org:3478'], username: `9999999999:u${n}`, credential: `cred-${n}` },
    ];
  }

  async offer(sessionId, secret, sdp) {
    this.record('offer', [sessionId, secret, sdp]);
    // `continueAs`: the relay that held the session died, so the answer is for a continuation.
    const answered = this.continueAs ?? sessionId;
    return { answer: 'v=0\r\nanswer', location: `/v1/sessions/${answered}/webrtc/peer_${this.count('offer')}` };
  }

  async endSession(sessionId, options) {
    this.record('endSession', [sessionId, options]);
    return { id: sessionId, status: 'ended' };
  }

  async transcript(sessionId) {
    this.record('transcript', [sessionId]);
    return this.stored;
  }
}

export function apiError(status, code, extra = {}) {
  return new ApiError({ status, code, detail: code, ...extra });
}
