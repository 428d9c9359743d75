/**
 * One practice call in the browser: microphone, session, WebRTC leg, events channel, reconnects.
 *
 * The order matters for what is left behind when something fails:
 *   1. the microphone first: a learner who cannot be heard never creates a session on the server;
 *   2. `POST /v1/sessions` (a session and a client secret);
 *   3. an `RTCPeerConnection` with the mic track and a data channel of our own (so the offer has
 *      the data section the relay needs to open `events`), the complete offer (no trickle) to
 *      `POST /v1/sessions/{id}/webrtc` with the client secret, the answer applied;
 *   4. live once the relay's `events` channel opens; a heartbeat runs on it.
 *
 * A leg that dies (no pong for 4.5 s, ICE failed, the channel closed, the browser went offline)
 * is replaced: a fresh client secret and a new offer to the same session, with backoff, until the
 * server says `session_ended` or the reconnect window is over. An expired client secret is
 * replaced transparently; an expired access token opens the sign-in dialog (see api.js) and the
 * call goes on after it. Every way out runs {@link CallController#cleanup}: no track, peer
 * connection or timer is left running.
 *
 * Everything the browser provides is injected (media devices, the peer connection class, timers,
 * the clock), so the whole controller runs in Vitest with fakes.
 */

import { ApiError, isClientSecretError } from './api.js';
import { Backoff, sleep } from './backoff.js';
import { Heartbeat } from './heartbeat.js';
import { CallMachine, isActive } from './machine.js';
import { apiErrorMessage, browserName, eventErrorMessage, micErrorMessage } from './messages.js';
import { Transcript } from './transcript.js';

/** The microphone as a voice call wants it: one channel, the browser's voice processing on. */
export const MIC_CONSTRAINTS = Object.freeze({
  audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
  video: false,
});

export const DEFAULT_OPTIONS = Object.freeze({
  iceGatherTimeoutMs: 3000,
  connectTimeoutMs: 10000,
  heartbeatMs: 1000,
  deadAfterMs: 4500,
  disconnectedGraceMs: 3000,
  reconnectWindowMs: 35000,
  capacityRetries: 2,
  micRetryMs: 2000,
  micGraceMs: 60000,
  backoff: { initialMs: 500, maxMs: 5000, factor: 2, jitter: 0.2 },
});

const FATAL_CODES = new Set(['invalid_sdp', 'invalid_request', 'not_found', 'signed_out']);

class LegError extends Error {
  constructor(code) {
    super(code);
    this.name = 'LegError';
    this.code = code;
  }
}

function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  const d = { promise, settled: false };
  d.resolve = (value) => {
    if (!d.settled) {
      d.settled = true;
      resolve(value);
    }
  };
  d.reject = (err) => {
    if (!d.settled) {
      d.settled = true;
      reject(err);
    }
  };
  promise.catch(() => {});
  return d;
}

function stopStream(stream) {
  for (const track of stream?.getTracks?.() ?? []) track.stop();
}

export class CallController {
  /**
   * @param {object} deps
   * @param {import('./api.js').Api} deps.api
   * @param {MediaDevices} deps.media `navigator.mediaDevices` (may be undefined: insecure page)
   * @param {(config: RTCConfiguration) => RTCPeerConnection} deps.createPeerConnection
   * @param {EventTarget} [deps.network] `window`, for its `offline` event
   */
  constructor({
    api,
    media,
    createPeerConnection,
    network = null,
    timers = globalThis,
    now = () => Date.now(),
    random = Math.random,
    userAgent = globalThis.navigator?.userAgent ?? '',
    secureContext = globalThis.isSecureContext ?? true,
    options = {},
  }) {
    Object.assign(this, { api, media, createPeerConnection, network, timers, now, random });
    this.browser = browserName(userAgent);
    this.secureContext = secureContext;
    this.options = { ...DEFAULT_OPTIONS, ...options, backoff: { ...DEFAULT_OPTIONS.backoff, ...(options.backoff ?? {}) } };
    this.listeners = new Map();
    this.machine = new CallMachine((change) => this.emit('state', change));
    this.transcript = new Transcript();
    this.onOffline = () => this.legDied('offline');
    this.onDeviceChange = () => this.tryMicAgain();
    this.resetCall();
  }

  resetCall() {
    this.sessionId = null;
    this.topicId = null;
    this.stream = null;
    this.track = null;
    this.pc = null;
    this.events = null;
    this.control = null;
    this.heartbeat = null;
    this.leg = null;
    this.location = null;
    this.generation = 0;
    this.everLive = false;
    this.serverStatus = null;
    this.coachSpeaking = false;
    this.lastError = null;
    this.micLostAt = null;
    this.micTimer = null;
    this.micRetrying = false;
    this.disconnectTimer = null;
    this.cleaned = false;
    this.firstLive = null;
  }

  // -- events to the UI --------------------------------------------------------------------------
  on(type, listener) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(listener);
    return () => this.listeners.get(type).delete(listener);
  }

  emit(type, detail = {}) {
    for (const listener of this.listeners.get(type) ?? []) listener(detail);
  }

  notice(code, message, level = 'warning') {
    this.emit('notice', { code, message, level });
  }

  clearNotice(code) {
    this.emit('notice', { code, message: null });
  }

  get state() {
    return this.machine.state;
  }

  get active() {
    return isActive(this.machine.state);
  }

  // -- start -------------------------------------------------------------------------------------
  /** Start a call on `topicId`; resolves true once live, false if it failed (the state says why). */
  async start(topicId) {
    if (this.machine.state === 'ended' || this.machine.state === 'failed') this.machine.fire('reset');
    this.resetCall();
    this.transcript.clear();
    if (!this.machine.fire('start', { topicId })) throw new Error('A call is already running.');
    this.topicId = topicId;

    let stream;
    try {
      if (!this.media || typeof this.media.getUserMedia !== 'function') {
        throw Object.assign(new Error('no mediaDevices'), { name: this.secureContext ? 'Unsupported' : 'InsecureContext' });
      }
      stream = await this.media.getUserMedia(MIC_CONSTRAINTS);
    } catch (err) {
      const why = micErrorMessage(err, this.browser);
      this.fail(why.message, { kind: why.kind, title: why.title });
      return false;
    }
    if (this.machine.state !== 'acquiring_mic') {
      stopStream(stream); // cancelled while the browser asked
      return false;
    }
    this.useStream(stream);
    this.machine.fire('mic_ready');

    let created;
    try {
      created = await this.api.createSession(topicId);
    } catch (err) {
      this.fail(apiErrorMessage(err, 'start'), { code: err.code, title: "The session didn't start" });
      return false;
    }
    this.sessionId = created.session.id;
    if (this.machine.state !== 'creating') {
      this.endOnServer(); // cancelled meanwhile: leave nothing open on the server
      return false;
    }
    this.emit('session', { session: created.session });
    this.machine.fire('created');
    this.network?.addEventListener?.('offline', this.onOffline);
    // The supervisor runs for the whole call; start() answers as soon as the first leg is up.
    const firstLive = deferred();
    this.firstLive = firstLive;
    this.runConnection(created.client_secret)
      .catch(() => this.fail('Something went wrong with the connection. Please start again.'))
      .finally(() => firstLive.resolve(this.everLive));
    return firstLive.promise;
  }

  // -- the connection supervisor ----------------------------------------------------------------
  /**
   * Connect, wait for the leg to die, reconnect; until the call is over. Resolves true if the
   * first connection came up.
   */
  async runConnection(firstSecret) {
    // A client secret is `{value, expires_at, ice_servers}`: the servers (TURN with a credential
    // as short-lived as the secret's use) come with each secret, so a reconnect gets fresh ones.
    const backoff = new Backoff({ ...this.options.backoff, random: this.random });
    let secret = firstSecret;
    let deadline = null;
    let capacityTries = 0;
    for (;;) {
      if (this.machine.state !== 'connecting' && this.machine.state !== 'reconnecting') return this.everLive;
      try {
        if (!secret) secret = await this.api.clientSecret(this.sessionId);
        const leg = await this.connectOnce(secret);
        secret = null;
        if (!this.machine.fire('connected')) return this.everLive;
        const reconnected = this.everLive;
        this.everLive = true;
        this.firstLive?.resolve(true);
        backoff.reset();
        deadline = null;
        this.clearNotice('connection');
        if (reconnected) this.catchUpTranscript();
        const reason = await leg.promise;
        if (reason === null || !this.machine.fire('lost', { reason })) return true;
        this.transcript.markPartialsInterrupted();
        this.setCoachSpeaking(false);
        this.closePeer();
        deadline = this.now() + this.options.reconnectWindowMs;
        continue; // the first new attempt at once
      } catch (err) {
        secret = null;
        if (!this.active || this.machine.state === 'ending') return this.everLive;
        if (err instanceof ApiError && err.code === 'session_ended') {
          this.serverEnded('The session has ended on the server.');
          return this.everLive;
        }
        if (err instanceof ApiError && (FATAL_CODES.has(err.code) || (err.status === 401 && !isClientSecretError(err)))) {
          this.fail(apiErrorMessage(err, 'connect'), { code: err.code });
          this.endOnServer();
          return this.everLive;
        }
        let wait = null;
        if (err instanceof ApiError && err.code === 'capacity') {
          capacityTries += 1;
          if (!this.everLive && capacityTries > this.options.capacityRetries) {
            this.fail(apiErrorMessage(err, 'connect'), { code: 'capacity', title: 'Parley is busy' });
            this.endOnServer();
            return false;
          }
          wait = err.retryAfterMs ?? 5000;
          this.notice('connection', `${apiErrorMessage(err, 'connect')} Trying again automatically…`, 'warning');
        }
        deadline ??= this.now() + this.options.reconnectWindowMs;
        if (this.now() >= deadline) {
          this.fail(
            this.everLive
              ? "The connection was lost and couldn't be restored. Everything up to the drop is saved in your history."
              : "Couldn't connect to the coach. Check your connection (a firewall may block calls), then try again.",
            { code: 'connect_failed' },
          );
          this.endOnServer();
          return this.everLive;
        }
        this.closePeer();
        await sleep(wait ?? backoff.next(), this.timers);
      }
    }
  }

  /** One WebRTC leg: resolves the leg's "died" deferred once the relay's `events` channel is open. */
  async connectOnce(secretIn) {
    let secret = secretIn.value;
    this.closePeer();
    this.generation += 1;
    const gen = this.generation;
    const leg = deferred();
    this.leg = leg;
    const opened = deferred();
    const pc = this.createPeerConnection({ iceServers: secretIn.ice_servers ?? [] });
    this.pc = pc;
    if (this.track && this.track.readyState !== 'ended') {
      pc.addTransceiver(this.track, { direction: 'sendrecv', streams: [this.stream] });
    } else {
      pc.addTransceiver('audio', { direction: 'sendrecv' }); // the mic is away; replaceTrack() when it returns
    }
    this.control = pc.createDataChannel('client');
    pc.ondatachannel = (event) => {
      if (gen === this.generation && event.channel.label === 'events') this.attachEvents(event.channel, gen, opened);
    };
    pc.ontrack = (event) => {
      if (gen !== this.generation) return;
      const stream = event.streams?.[0] ?? (typeof MediaStream === 'function' ? new MediaStream([event.track]) : null);
      this.emit('remote-stream', { stream });
    };
    pc.onconnectionstatechange = () => this.onConnectionState(pc, gen);

    await pc.setLocalDescription(await pc.createOffer());
    await this.iceGathered(pc);
    this.assertCurrent(gen);
    let reply;
    try {
      reply = await this.api.offer(this.sessionId, secret, pc.localDescription.sdp);
    } catch (err) {
      if (!isClientSecretError(err)) throw err;
      this.assertCurrent(gen);
      secret = (await this.api.clientSecret(this.sessionId)).value; // expired or used: a fresh one, once
      this.assertCurrent(gen);
      reply = await this.api.offer(this.sessionId, secret, pc.localDescription.sdp);
    }
    this.assertCurrent(gen);
    this.location = reply.location;
    this.followContinuation(reply.location);
    await pc.setRemoteDescription({ type: 'answer', sdp: reply.answer });
    this.assertCurrent(gen);

    let timer = null;
    const timedOut = new Promise((_, reject) => {
      timer = this.timers.setTimeout(() => reject(new LegError('connect_timeout')), this.options.connectTimeoutMs);
    });
    const died = leg.promise.then((reason) => {
      throw new LegError(reason ?? 'cancelled');
    });
    try {
      await Promise.race([opened.promise, timedOut, died]);
    } finally {
      this.timers.clearTimeout(timer);
    }
    this.assertCurrent(gen);
    return leg;
  }

  assertCurrent(gen) {
    if (gen !== this.generation || !this.active) throw new LegError('superseded');
  }

  /** Wait until every ICE candidate is in the local description (the relay takes no trickle). */
  iceGathered(pc) {
    if (pc.iceGatheringState === 'complete') return Promise.resolve();
    return new Promise((resolve) => {
      let timer = null;
      const done = () => {
        this.timers.clearTimeout(timer);
        pc.removeEventListener('icegatheringstatechange', check);
        resolve();
      };
      const check = () => {
        if (pc.iceGatheringState === 'complete') done();
      };
      timer = this.timers.setTimeout(done, this.options.iceGatherTimeoutMs);
      pc.addEventListener('icegatheringstatechange', check);
    });
  }

  attachEvents(channel, gen, opened) {
    this.events = channel;
    const onOpen = () => {
      if (gen !== this.generation) return;
      this.heartbeat?.stop();
      this.heartbeat = new Heartbeat({
        send: (text) => channel.send(text),
        onDead: () => this.legDied('heartbeat', gen),
        intervalMs: this.options.heartbeatMs,
        deadAfterMs: this.options.deadAfterMs,
        timers: this.timers,
        now: this.now,
      });
      this.heartbeat.start();
      opened.resolve();
    };
    channel.onopen = onOpen;
    channel.onmessage = (event) => {
      if (gen !== this.generation) return;
      this.heartbeat?.seen();
      this.handleMessage(event.data);
    };
    channel.onclose = () => this.legDied('channel_closed', gen);
    if (channel.readyState === 'open') onOpen();
  }

  onConnectionState(pc, gen) {
    if (gen !== this.generation) return;
    const state = pc.connectionState;
    if (state === 'failed' || state === 'closed') {
      this.legDied(`ice_${state}`, gen);
    } else if (state === 'disconnected') {
      // Often back within a second or two; if not, the leg is gone (the heartbeat agrees soon after).
      this.timers.clearTimeout(this.disconnectTimer);
      this.disconnectTimer = this.timers.setTimeout(() => {
        if (gen === this.generation && pc.connectionState === 'disconnected') this.legDied('ice_disconnected', gen);
      }, this.options.disconnectedGraceMs);
    }
  }

  /**
   * When the relay holding the session died, the session is `interrupted` and the reconnect is
   * answered for a fresh session continuing it, named by the answer's Location. From then on
   * secrets, End and the transcript catch-up are about the new session.
   */
  followContinuation(location) {
    const match = /^\/v1\/sessions\/([^/]+)\/webrtc\//.exec(location ?? '');
    if (!match) return;
    const id = decodeURIComponent(match[1]);
    if (id === this.sessionId) return;
    const from = this.sessionId;
    this.sessionId = id;
    this.emit('session-continued', { from, to: id });
  }

  /** The current leg is gone (`gen` guards against a late event of an older leg). */
  legDied(reason, gen = this.generation) {
    if (gen !== this.generation || !this.leg) return;
    this.leg.resolve(reason);
  }

  catchUpTranscript() {
    // Segments finalized while no leg was connected were stored but never sent to us.
    const sessionId = this.sessionId;
    this.api
      .transcript(sessionId)
      .then((segments) => {
        if (this.sessionId === sessionId) this.transcript.mergeStored(segments);
      })
      .catch(() => {});
  }

  // -- the events channel ----------------------------------------------------------------------
  handleMessage(raw) {
    let event;
    try {
      event = JSON.parse(raw);
    } catch {
      return;
    }
    if (!event || typeof event.type !== 'string') return;
    switch (event.type) {
      case 'pong':
        return;
      case 'session.state':
        this.onServerStatus(event.status);
        return;
      case 'transcript.delta':
        this.clearNotice('upstream');
        this.transcript.applyDelta(event);
        return;
      case 'transcript.final':
        this.transcript.applyFinal(event.segment, event.item_id ?? event.segment?.item_id ?? null);
        return;
      case 'coach.speaking':
        this.clearNotice('upstream');
        this.setCoachSpeaking(true, event.item_id);
        return;
      case 'coach.done':
        this.setCoachSpeaking(false, event.item_id);
        return;
      case 'error':
        this.lastError = eventErrorMessage(event);
        this.notice('upstream', this.lastError, event.code === 'upstream_retrying' ? 'warning' : 'error');
        return;
      default:
        return; // API.md allows new event types: ignore what we do not know
    }
  }

  onServerStatus(status) {
    this.serverStatus = status;
    this.emit('server-status', { status });
    if (this.machine.state === 'ending') return; // we asked for it; end() finishes the job
    if (status === 'ending' || status === 'ended' || status === 'failed' || status === 'interrupted') {
      this.serverEnded(this.lastError ?? 'The session has ended.');
    }
  }

  setCoachSpeaking(speaking, itemId = null) {
    if (this.coachSpeaking === speaking) return;
    this.coachSpeaking = speaking;
    this.emit('coach', { speaking, itemId });
  }

  // -- the microphone --------------------------------------------------------------------------
  useStream(stream) {
    if (this.track) {
      this.track.onended = null;
      this.track.onmute = null;
      this.track.onunmute = null;
    }
    this.stream = stream;
    this.track = stream.getAudioTracks()[0] ?? null;
    if (this.track) {
      this.track.onended = () => this.micLost();
      this.track.onmute = () => {
        if (this.active) this.notice('mic_muted', 'Your microphone is muted by your system or headset. Unmute it to be heard.');
      };
      this.track.onunmute = () => this.clearNotice('mic_muted');
    }
    this.emit('mic', { stream });
  }

  /** The mic track ended under us (unplugged, permission revoked): tell, retry, end if it stays away. */
  micLost() {
    if (!this.active || this.machine.state === 'ending' || this.micLostAt !== null) return;
    this.micLostAt = this.now();
    const minutes = Math.round(this.options.micGraceMs / 1000);
    this.notice(
      'mic_lost',
      `Your microphone stopped: it was unplugged or access to it was turned off. Plug it back in or allow it again; Parley picks it up automatically. Without it, the session ends in ${minutes} seconds.`,
      'error',
    );
    this.emit('mic', { stream: null });
    this.media?.addEventListener?.('devicechange', this.onDeviceChange);
    this.micTimer = this.timers.setInterval(() => this.tryMicAgain(), this.options.micRetryMs);
  }

  async tryMicAgain() {
    if (this.micLostAt === null || this.micRetrying) return;
    if (!this.active || this.machine.state === 'ending') {
      this.stopMicRetry();
      return;
    }
    if (this.now() - this.micLostAt >= this.options.micGraceMs) {
      this.stopMicRetry();
      await this.end({ message: "The session ended because the microphone didn't come back. Everything up to then is saved." });
      return;
    }
    this.micRetrying = true;
    try {
      const stream = await this.media.getUserMedia(MIC_CONSTRAINTS);
      if (!this.active || this.machine.state === 'ending') {
        stopStream(stream);
        return;
      }
      const track = stream.getAudioTracks()[0];
      const sender = this.pc?.getTransceivers?.()[0]?.sender;
      if (sender) await sender.replaceTrack(track);
      stopStream(this.stream);
      this.useStream(stream);
      this.stopMicRetry();
      this.clearNotice('mic_lost');
      this.notice('mic_back', 'Your microphone is back.', 'info');
    } catch {
      // still away; the next tick or device change tries again
    } finally {
      this.micRetrying = false;
    }
  }

  stopMicRetry() {
    this.micLostAt = null;
    if (this.micTimer !== null) this.timers.clearInterval(this.micTimer);
    this.micTimer = null;
    this.media?.removeEventListener?.('devicechange', this.onDeviceChange);
  }

  // -- ending ----------------------------------------------------------------------------------
  /** End the call (the learner pressed End, or the mic never came back). Resolves when done. */
  async end({ message = null } = {}) {
    const state = this.machine.state;
    if (state === 'acquiring_mic' || state === 'creating') {
      this.machine.fire('cancel', { message });
      this.cleanup();
      return null;
    }
    if (!this.machine.fire('end')) return null;
    this.leg?.resolve(null);
    try {
      this.events?.send('{"type":"session.end"}');
    } catch {
      // the POST below ends it anyway
    }
    let session = null;
    let error = null;
    try {
      session = await this.api.endSession(this.sessionId);
    } catch (err) {
      error = err;
    }
    this.cleanup();
    let text = message;
    if (error && !(error instanceof ApiError && error.code === 'session_ended')) {
      text = error.network
        ? "The session is ended on this device; Parley couldn't be told right now and ends it on its own shortly."
        : apiErrorMessage(error, 'end');
    }
    this.machine.fire('ended', { session, message: text });
    return session;
  }

  /**
   * The page is going away (or the learner signs out): end the session on the server without
   * waiting (a keepalive request survives the unload) and free everything here.
   */
  abandon(message = null) {
    if (!this.active) return;
    try {
      this.events?.send('{"type":"session.end"}');
    } catch {
      // best effort
    }
    if (this.sessionId) this.api.endSession(this.sessionId, { keepalive: true }).catch(() => {});
    this.cleanup();
    if (!this.machine.fire('cancel', { message })) {
      this.machine.fire('end');
      this.machine.fire('ended', { message });
    }
  }

  serverEnded(message) {
    if (!this.machine.fire('server_ended', { message })) return;
    this.cleanup();
  }

  fail(message, detail = {}) {
    this.machine.fire('fail', { message, ...detail });
    this.cleanup();
  }

  /** Best effort: a session this call created must not stay open on the server. */
  endOnServer() {
    if (this.sessionId) this.api.endSession(this.sessionId).catch(() => {});
  }

  closePeer() {
    this.timers.clearTimeout(this.disconnectTimer);
    this.disconnectTimer = null;
    this.heartbeat?.stop();
    this.heartbeat = null;
    for (const channel of [this.events, this.control]) {
      if (!channel) continue;
      channel.onopen = null;
      channel.onmessage = null;
      channel.onclose = null;
      try {
        channel.close();
      } catch {
        // already closed
      }
    }
    this.events = null;
    this.control = null;
    const pc = this.pc;
    this.pc = null;
    if (pc) {
      pc.ondatachannel = null;
      pc.ontrack = null;
      pc.onconnectionstatechange = null;
      try {
        pc.close();
      } catch {
        // already closed
      }
    }
  }

  /** Free everything this call holds; idempotent. */
  cleanup() {
    this.generation += 1; // late events of any leg are ignored from here on
    this.leg?.resolve(null);
    this.closePeer();
    this.stopMicRetry();
    if (this.track) {
      this.track.onended = null;
      this.track.onmute = null;
      this.track.onunmute = null;
    }
    stopStream(this.stream);
    this.stream = null;
    this.track = null;
    this.network?.removeEventListener?.('offline', this.onOffline);
    this.setCoachSpeaking(false);
    if (!this.cleaned) {
      this.cleaned = true;
      this.emit('mic', { stream: null });
      this.emit('remote-stream', { stream: null });
    }
  }
}
