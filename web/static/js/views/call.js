/** The live call: status, who is talking, mic level, live transcript, the coach's voice, End. */

import { h, replace } from '../dom.js';
import { clock } from '../format.js';
import { MicMeter } from '../meter.js';
import { sessionHref } from '../router.js';

const STATUS = {
  idle: 'Not started',
  acquiring_mic: 'Asking for your microphone…',
  creating: 'Starting your session…',
  connecting: 'Connecting to the coach…',
  live: 'Live',
  reconnecting: 'Connection lost. Reconnecting…',
  ending: 'Ending and saving your session…',
  ended: 'Session ended',
  failed: "The session couldn't continue",
};

export class CallView {
  constructor(ctx, root) {
    this.ctx = ctx;
    this.root = root;
    this.topic = null;
    this.audioContext = null;
    this.notices = new Map();
    this.items = new Map();
    this.liveSince = null;
    this.clockTimer = null;
    this.build();
    const c = ctx.controller;
    c.on('state', (change) => this.onState(change));
    c.on('notice', (n) => this.onNotice(n));
    c.on('coach', () => this.renderTurn());
    c.on('server-status', () => this.renderStatus());
    c.on('mic', ({ stream }) => this.onMic(stream));
    c.on('remote-stream', ({ stream }) => this.onRemote(stream));
    c.on('session', ({ session }) => {
      this.root.dataset.sessionId = session.id;
    });
    c.transcript.onChange(() => this.renderTranscript());
    this.meter = new MicMeter({
      audioContext: () => this.audioContext,
      onLevel: (level, speaking) => {
        this.level.value = level;
        this.level.textContent = `${level}%`;
        this.speaking = speaking;
        this.renderTurn();
      },
    });
  }

  build() {
    this.heading = h('h1', { tabindex: '-1', text: 'Practice session' });
    this.statusText = h('p', { class: 'call-status', id: 'call-status', role: 'status', 'aria-live': 'polite' });
    this.elapsed = h('span', { class: 'elapsed', 'aria-label': 'Time in session' });
    this.turn = h('p', { class: 'turn', id: 'turn-indicator', 'aria-live': 'polite', hidden: true });
    this.level = h('meter', { id: 'mic-level', min: '0', max: '100', low: '15', high: '90', optimum: '50', value: '0' });
    this.meterRow = h('div', { class: 'meter-row' }, h('label', { for: 'mic-level', text: 'Your microphone' }), this.level);
    this.noticeList = h('div', { class: 'notices', id: 'call-notices', role: 'alert' });
    this.prompts = h('ul', { class: 'prompts' });
    this.promptBox = h('details', { class: 'card prompt-box', open: true }, h('summary', { text: 'Ideas to talk about' }), this.prompts);
    this.transcriptList = h('ol', { class: 'transcript', id: 'live-transcript', 'aria-label': 'Live transcript', 'aria-live': 'polite', 'aria-relevant': 'additions' });
    this.transcriptEmpty = h('p', { class: 'muted', text: 'The transcript appears here as you and the coach speak.' });
    this.endButton = h('button', { type: 'button', class: 'danger', id: 'end-session', text: 'End session', onclick: () => this.endCall() });
    this.soundButton = h('button', { type: 'button', class: 'secondary', hidden: true, text: 'Turn on the coach’s voice', onclick: () => this.playCoach() });
    this.after = h('div', { class: 'actions', hidden: true });
    this.audio = h('audio', { id: 'coach-audio', autoplay: true, hidden: true });
    replace(
      this.root,
      h('div', { class: 'call-head' }, this.heading, this.elapsed),
      this.statusText,
      this.noticeList,
      h('div', { class: 'card call-panel' }, this.turn, this.meterRow, h('div', { class: 'actions' }, this.endButton, this.soundButton), this.after),
      this.promptBox,
      h('section', { class: 'card', 'aria-labelledby': 'live-transcript-title' }, h('h2', { id: 'live-transcript-title', text: 'Transcript' }), this.transcriptEmpty, this.transcriptList),
      this.audio,
    );
    this.renderStatus();
  }

  focusTarget() {
    return this.heading;
  }

  show() {
    if (!this.topic && !this.ctx.controller.active) {
      this.statusText.textContent = 'No session is running. Pick a topic to start one.';
      replace(this.after, h('a', { href: '#/topics', class: 'button primary', text: 'Pick a topic' }));
      this.after.hidden = false;
      this.endButton.hidden = true;
    }
  }

  /** Called from the Start click, so the audio context is created within the learner's gesture. */
  start(topic) {
    this.topic = topic;
    this.heading.textContent = topic.title;
    replace(this.prompts, ...(topic.prompts ?? []).map((p) => h('li', { text: p })), ...(topic.hints ?? []).map((p) => h('li', { class: 'hint', text: `Hint: ${p}` })));
    this.notices.clear();
    this.renderNotices();
    this.items.clear();
    this.transcriptList.replaceChildren();
    this.after.hidden = true;
    this.endButton.hidden = false;
    this.endButton.disabled = false;
    delete this.root.dataset.sessionId;
    try {
      const Context = globalThis.AudioContext ?? globalThis.webkitAudioContext;
      this.audioContext ??= Context ? new Context() : null;
      if (this.audioContext?.state === 'suspended') this.audioContext.resume().catch(() => {});
    } catch {
      this.audioContext = null; // the meter stays at zero; the call works without it
    }
    return this.ctx.controller.start(topic.id);
  }

  async endCall() {
    this.endButton.disabled = true;
    await this.ctx.controller.end();
  }

  onState({ state, message, title: heading }) {
    this.root.dataset.callState = state;
    this.lastMessage = message ?? null;
    this.lastTitle = heading ?? null;
    if (state === 'live' && this.liveSince === null) {
      this.liveSince = Date.now();
      this.clockTimer = setInterval(() => this.renderClock(), 1000);
    }
    if (state === 'ended' || state === 'failed' || state === 'idle') {
      clearInterval(this.clockTimer);
      this.clockTimer = null;
    }
    if (state === 'acquiring_mic') {
      this.liveSince = null;
      this.elapsed.textContent = '';
    }
    if (state === 'reconnecting') this.notices.delete('connection');
    this.endButton.hidden = state === 'ended' || state === 'failed';
    this.meterRow.hidden = state === 'ended' || state === 'failed' || state === 'idle';
    this.endButton.disabled = state === 'ending';
    if (state === 'ended' || state === 'failed') this.renderAfter(state);
    this.renderStatus();
    this.renderTurn();
    this.ctx.onCallState(state);
  }

  renderClock() {
    if (this.liveSince !== null) this.elapsed.textContent = clock(Date.now() - this.liveSince);
  }

  renderStatus() {
    const c = this.ctx.controller;
    let text = STATUS[c.state] ?? c.state;
    if (c.state === 'live') {
      text = c.serverStatus === 'live' ? 'Live: talk whenever you are ready' : 'Connected. Waiting for the coach…';
    }
    if ((c.state === 'ended' || c.state === 'failed') && this.lastTitle) text = this.lastTitle;
    this.statusText.textContent = text;
    this.statusText.dataset.state = c.state;
    if ((c.state === 'ended' || c.state === 'failed') && this.lastMessage) {
      this.notices.set('final', { message: this.lastMessage, level: c.state === 'failed' ? 'error' : 'info' });
      this.renderNotices();
    }
  }

  renderAfter(state) {
    const c = this.ctx.controller;
    const links = [];
    if (c.sessionId && state === 'ended') links.push(h('a', { href: sessionHref(c.sessionId), class: 'button primary', text: 'Replay this session' }));
    if (this.topic && state === 'failed') links.push(h('button', { type: 'button', class: 'primary', text: 'Try again', onclick: () => this.ctx.startCall(this.topic) }));
    links.push(h('a', { href: '#/topics', class: 'button secondary', text: 'Pick another topic' }));
    replace(this.after, ...links);
    this.after.hidden = false;
  }

  renderTurn() {
    const c = this.ctx.controller;
    const live = c.state === 'live' && c.serverStatus === 'live';
    this.turn.hidden = !live;
    let state = 'listening';
    let text = 'Your turn: the coach is listening';
    if (c.coachSpeaking) {
      state = 'coach';
      text = 'The coach is speaking';
    } else if (this.speaking) {
      state = 'learner';
      text = 'You are speaking';
    }
    if (this.turn.dataset.state !== state) {
      this.turn.dataset.state = state;
      this.turn.textContent = text;
    }
  }

  onNotice({ code, message, level }) {
    if (message === null) this.notices.delete(code);
    else this.notices.set(code, { message, level });
    if (code === 'mic_back') setTimeout(() => this.onNotice({ code, message: null }), 4000);
    this.renderNotices();
  }

  renderNotices() {
    replace(
      this.noticeList,
      ...[...this.notices.entries()].map(([code, n]) => h('p', { class: `notice ${n.level}`, dataset: { code }, text: n.message })),
    );
  }

  onMic(stream) {
    if (stream) this.meter.attach(stream);
    else this.meter.detach();
  }

  onRemote(stream) {
    this.audio.srcObject = stream;
    if (stream) this.playCoach();
  }

  playCoach() {
    const played = this.audio.play();
    if (!played) return;
    played.then(
      () => {
        this.soundButton.hidden = true;
      },
      (err) => {
        // Autoplay refused (no recent click): one press of this button fixes it.
        if (err && err.name === 'NotAllowedError') this.soundButton.hidden = false;
      },
    );
  }

  renderTranscript() {
    const entries = this.ctx.controller.transcript.ordered();
    const seen = new Set();
    const nearBottom = this.isNearBottom();
    for (const entry of entries) {
      seen.add(entry.key);
      let item = this.items.get(entry.key);
      if (!item) {
        const who = h('span', { class: 'who' });
        const text = h('span', { class: 'text' });
        item = { li: h('li', {}, who, ' ', text), who, text };
        this.items.set(entry.key, item);
      }
      item.li.className = `seg ${entry.speaker}${entry.final ? '' : ' partial'}${entry.interrupted ? ' interrupted' : ''}`;
      item.li.dataset.speaker = entry.speaker;
      item.li.dataset.final = String(entry.final);
      item.who.textContent = entry.speaker === 'coach' ? 'Coach' : 'You';
      const text = entry.interrupted ? `${entry.text} (cut off)` : entry.text;
      if (item.text.textContent !== text) item.text.textContent = text;
    }
    for (const [key, item] of this.items) {
      if (!seen.has(key)) {
        item.li.remove();
        this.items.delete(key);
      }
    }
    // Move only what is out of place, so screen readers hear each new line once.
    entries.forEach((entry, i) => {
      const li = this.items.get(entry.key).li;
      const at = this.transcriptList.children[i] ?? null;
      if (at !== li) this.transcriptList.insertBefore(li, at);
    });
    this.transcriptEmpty.hidden = entries.length > 0;
    if (nearBottom) this.transcriptList.lastElementChild?.scrollIntoView?.({ block: 'nearest' });
  }

  isNearBottom() {
    const doc = document.scrollingElement ?? document.documentElement;
    return doc.scrollHeight - doc.scrollTop - doc.clientHeight < 200;
  }
}
