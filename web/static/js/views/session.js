/**
 * One past session: facts and rating, both tracks played as one (seekable) with the transcript
 * following along, and export, publish / make private, delete. While the rating is still to come,
 * the session is read again now and then, so the rating appears without a reload.
 */

import { ApiError } from '../api.js';
import { download, h, replace } from '../dom.js';
import { clock, duration, title, when } from '../format.js';
import { apiErrorMessage, statusLabel } from '../messages.js';
import { SyncPlayer, activeSegment } from '../player.js';
import { ratingSection } from '../rating.js';
import { confirmAction, publishFlow } from './dialogs.js';

const FINISHED = new Set(['ended', 'processing', 'processed', 'processing_failed', 'interrupted', 'failed']);
// Sessions that went live and ended: the ones the worker rates.
const RATED = new Set(['ended', 'processing', 'processed', 'processing_failed', 'interrupted']);
// Post-processing has not finished: a rating may still come or change.
const SETTLING = new Set(['ended', 'processing']);
const RATING_POLL_MS = 4000;
const RATING_POLLS = 45; // three minutes; after that a reload shows whatever came

export class SessionView {
  constructor(ctx, root) {
    this.ctx = ctx;
    this.root = root;
    this.player = null;
    this.urls = [];
    this.ratingTimer = null;
    this.heading = h('h1', { tabindex: '-1', text: 'Session' });
    this.status = h('p', { class: 'muted', role: 'status', id: 'session-status' });
    this.body = h('div');
    replace(this.root, h('p', {}, h('a', { href: '#/history', text: '← All sessions' })), this.heading, this.status, this.body);
  }

  focusTarget() {
    return this.heading;
  }

  hide() {
    this.teardown();
  }

  teardown() {
    this.stopRatingWatch();
    this.player?.destroy();
    this.player = null;
    for (const url of this.urls) URL.revokeObjectURL(url);
    this.urls = [];
  }

  async show({ id }) {
    this.teardown();
    this.id = id;
    this.heading.textContent = 'Session';
    replace(this.body);
    this.status.textContent = 'Loading…';
    let session;
    let segments;
    let topics;
    try {
      [session, segments, topics] = await Promise.all([this.ctx.api.getSession(id), this.ctx.api.transcript(id), this.ctx.topics.byId()]);
    } catch (err) {
      this.status.textContent = err instanceof ApiError && err.status === 404 ? 'This session does not exist (any more).' : apiErrorMessage(err, 'load');
      return;
    }
    if (this.id !== id) return;
    this.session = session;
    this.segments = segments.filter((s) => s.final !== false);
    const topic = topics.get(session.topic_id);
    this.heading.textContent = topic ? topic.title : 'Practice session';
    this.status.textContent = '';
    this.render(topic);
  }

  render(topic) {
    const s = this.session;
    this.root.dataset.sessionId = s.id;
    this.root.dataset.visibility = s.visibility;
    this.facts = h(
      'dl',
      { class: 'facts card' },
      topic ? this.fact('Level', title(topic.difficulty)) : null,
      this.fact('Date', when(s.started_at ?? s.created_at)),
      this.fact('Status', statusLabel(s.status), 'status'),
      this.fact('Length', duration(s.duration_ms)),
      this.fact('Visibility', s.visibility === 'public' ? 'Public' : 'Private', 'visibility'),
    );
    this.message = h('p', { class: 'notice info', role: 'status', id: 'session-message', hidden: true });
    this.playerBox = h('section', { class: 'card player', 'aria-labelledby': 'player-title' }, h('h2', { id: 'player-title', text: 'Listen again' }));
    this.transcriptList = h('ol', { class: 'transcript replay', id: 'session-transcript', 'aria-label': 'Transcript' });
    this.ratingBox = h('div', { class: 'rating-box' }, ratingSection(s.rating, { expected: RATED.has(s.status) }));
    replace(
      this.body,
      this.facts,
      this.ratingBox,
      this.message,
      (this.actionsEl = this.actions()),
      this.playerBox,
      h('section', { class: 'card', 'aria-labelledby': 'transcript-title' }, h('h2', { id: 'transcript-title', text: 'Transcript' }), this.segments.length ? this.transcriptList : h('p', { class: 'muted', text: 'Nothing was transcribed in this session.' })),
    );
    this.renderTranscript();
    this.setupPlayer();
    this.watchRating(RATING_POLLS);
  }

  stopRatingWatch() {
    clearTimeout(this.ratingTimer);
    this.ratingTimer = null;
    this.ratingWatch = null; // a read already in flight sees this and stops
  }

  /** Read the session again later while its rating is pending or still to come. */
  watchRating(left) {
    const s = this.session;
    const waiting = s.rating?.status === 'pending' || (!s.rating && SETTLING.has(s.status));
    if (!waiting || left <= 0) return;
    const watch = (this.ratingWatch = {});
    this.ratingTimer = setTimeout(async () => {
      let fresh;
      try {
        fresh = await this.ctx.api.getSession(s.id);
      } catch {
        return; // the page still shows the last state; a reload tries again
      }
      if (this.ratingWatch !== watch) return; // the learner moved on meanwhile
      const changed = JSON.stringify(fresh.rating ?? null) !== JSON.stringify(s.rating ?? null);
      s.rating = fresh.rating ?? null;
      s.status = fresh.status;
      const dd = this.facts.querySelector('[data-fact="status"]');
      if (dd) dd.textContent = statusLabel(s.status);
      if (changed) replace(this.ratingBox, ratingSection(s.rating, { expected: RATED.has(s.status) }));
      this.watchRating(left - 1);
    }, RATING_POLL_MS);
  }

  fact(label, value, key = null) {
    return h('div', {}, h('dt', { text: label }), h('dd', { text: value, dataset: key ? { fact: key } : undefined }));
  }

  actions() {
    const s = this.session;
    const finished = FINISHED.has(s.status);
    const exportButton = h('button', { type: 'button', class: 'secondary', id: 'export-session', text: 'Download (zip)', onclick: (e) => this.exportZip(e.currentTarget) });
    const publish =
      s.visibility === 'public'
        ? h('button', { type: 'button', class: 'secondary', id: 'unpublish-session', text: 'Make private', onclick: () => this.unpublish() })
        : h('button', { type: 'button', class: 'secondary', id: 'publish-session', text: 'Publish…', disabled: !finished, onclick: () => this.publish() });
    const remove = h('button', { type: 'button', class: 'danger', id: 'delete-session', text: 'Delete…', onclick: () => this.remove() });
    return h('div', { class: 'actions', role: 'group', 'aria-label': 'Session actions' }, exportButton, publish, remove);
  }

  say(text, level = 'info') {
    this.message.className = `notice ${level}`;
    this.message.textContent = text;
    this.message.hidden = !text;
  }

  // -- playback ------------------------------------------------------------------------------
  async setupPlayer() {
    const s = this.session;
    const tracks = (s.audio ?? []).map((a) => a.track).filter((t) => t === 'learner' || t === 'coach');
    if (!FINISHED.has(s.status)) {
      this.playerBox.append(h('p', { class: 'muted', text: 'This session is still running; it can be replayed once it has ended.' }));
      return;
    }
    if (tracks.length === 0) {
      this.playerBox.append(h('p', { class: 'muted', text: 'No audio was recorded in this session.' }));
      return;
    }
    const loading = h('p', { class: 'muted', role: 'status', text: 'Loading the audio…' });
    this.playerBox.append(loading);
    const id = s.id;
    let blobs;
    try {
      blobs = await Promise.all(tracks.map((t) => this.ctx.api.audio(id, t)));
    } catch (err) {
      loading.textContent = apiErrorMessage(err, 'audio');
      return;
    }
    if (this.id !== id) return;
    loading.remove();
    const elements = blobs.map((blob, i) => {
      const url = URL.createObjectURL(blob);
      this.urls.push(url);
      return h('audio', { preload: 'auto', src: url, dataset: { track: tracks[i] } });
    });
    const knownS = Math.max(0, ...(s.audio ?? []).map((a) => (a.duration_ms ?? 0) / 1000), (s.duration_ms ?? 0) / 1000);
    const playButton = h('button', { type: 'button', class: 'primary play', id: 'play-pause', text: 'Play' });
    const seek = h('input', { type: 'range', id: 'seek', min: '0', max: String(Math.max(1, Math.round(knownS * 10))), step: '1', value: '0', 'aria-label': 'Position in the session' });
    const time = h('span', { class: 'time', id: 'play-time', text: `0:00 / ${clock(knownS * 1000)}` });
    const mutes = elements.map((el, i) =>
      h(
        'label',
        { class: 'check' },
        h('input', { type: 'checkbox', checked: true, onchange: (e) => { el.muted = !e.currentTarget.checked; } }),
        tracks[i] === 'coach' ? ' Coach' : ' You',
      ),
    );
    let seeking = false;
    this.player = new SyncPlayer(
      elements,
      {
        onTime: (t) => {
          const total = this.player?.duration ?? knownS;
          seek.max = String(Math.max(1, Math.round(total * 10)));
          if (!seeking) seek.value = String(Math.round(t * 10));
          const label = `${clock(t * 1000)} / ${clock(total * 1000)}`;
          time.textContent = label;
          seek.setAttribute('aria-valuetext', `${clock(t * 1000)} of ${clock(total * 1000)}`);
          this.highlight(t * 1000);
        },
        onPlaying: (playing) => {
          playButton.textContent = playing ? 'Pause' : 'Play';
          playButton.setAttribute('aria-pressed', String(playing));
        },
      },
      knownS,
    );
    playButton.addEventListener('click', () => {
      this.player.toggle().catch(() => this.say("The browser didn't start playback. Press Play again.", 'warning'));
    });
    seek.addEventListener('input', () => {
      seeking = true;
      this.player.seek(Number(seek.value) / 10);
    });
    seek.addEventListener('change', () => {
      seeking = false;
    });
    this.playerBox.append(
      h('div', { class: 'player-row' }, playButton, seek, time),
      h('div', { class: 'player-row', role: 'group', 'aria-label': 'Voices' }, ...mutes),
      ...elements,
    );
  }

  renderTranscript() {
    replace(
      this.transcriptList,
      ...this.segments.map((seg, i) =>
        h(
          'li',
          { class: `seg ${seg.speaker}`, dataset: { index: String(i), speaker: seg.speaker } },
          h('button', {
            type: 'button',
            class: 'at',
            text: clock(seg.start_ms),
            'aria-label': `Play from ${clock(seg.start_ms)}`,
            onclick: () => this.playFrom(seg.start_ms),
          }),
          h('span', { class: 'who', text: seg.speaker === 'coach' ? 'Coach' : 'You' }),
          ' ',
          h('span', { class: 'text', text: seg.text }),
        ),
      ),
    );
  }

  playFrom(ms) {
    if (!this.player) return;
    this.player.seek(ms / 1000);
    if (!this.player.playing) this.player.play().catch(() => {});
  }

  highlight(ms) {
    const index = activeSegment(this.segments, ms);
    if (index === this.activeIndex) return;
    this.activeIndex = index;
    for (const li of this.transcriptList.children) {
      if (Number(li.dataset.index) === index) {
        li.setAttribute('aria-current', 'true');
        if (this.player?.playing) li.scrollIntoView?.({ block: 'nearest' });
      } else {
        li.removeAttribute('aria-current');
      }
    }
  }

  // -- actions -------------------------------------------------------------------------------
  async exportZip(button) {
    button.disabled = true;
    this.say('Preparing your download…');
    try {
      const { blob, filename } = await this.ctx.api.exportSession(this.session.id);
      download(blob, filename);
      this.say('Downloaded: audio of both voices, the transcript and the session details.');
    } catch (err) {
      this.say(apiErrorMessage(err, 'export'), 'error');
    } finally {
      button.disabled = false;
    }
  }

  async publish() {
    const published = await publishFlow({ api: this.ctx.api, sessionId: this.session.id });
    if (!published) return;
    this.setVisibility('public');
    const url = new URL(published.url, location.origin).href;
    this.message.hidden = false;
    this.message.className = 'notice info';
    this.message.replaceChildren('This session is public: ', h('a', { href: url, target: '_blank', rel: 'noopener noreferrer', id: 'public-url', text: url }));
  }

  async unpublish() {
    const ok = await confirmAction({
      title: 'Make this session private?',
      body: 'The public link stops working at once. Publishing again later gives a new link.',
      confirmLabel: 'Make private',
    });
    if (!ok) return;
    try {
      await this.ctx.api.unpublish(this.session.id);
    } catch (err) {
      this.say(apiErrorMessage(err, 'publish'), 'error');
      return;
    }
    this.setVisibility('private');
    this.say('This session is private again. The old link no longer works.');
  }

  async remove() {
    const ok = await confirmAction({
      title: 'Delete this session?',
      body: 'Its audio, transcript and rating are deleted for good, and a public link stops working. This cannot be undone.',
      confirmLabel: 'Delete for good',
      danger: true,
    });
    if (!ok) return;
    this.stopRatingWatch(); // no read of a session that is being deleted (it would answer 404)
    try {
      await this.ctx.api.deleteSession(this.session.id);
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 404)) {
        this.say(apiErrorMessage(err, 'delete'), 'error');
        return;
      }
    }
    this.teardown();
    this.ctx.flash('The session was deleted.');
    this.ctx.go('#/history');
  }

  setVisibility(visibility) {
    this.session.visibility = visibility;
    this.root.dataset.visibility = visibility;
    const dd = this.facts.querySelector('[data-fact="visibility"]');
    if (dd) dd.textContent = visibility === 'public' ? 'Public' : 'Private';
    const next = this.actions();
    const hadFocus = this.actionsEl.contains(document.activeElement);
    this.actionsEl.replaceWith(next);
    this.actionsEl = next;
    if (hadFocus || document.activeElement === document.body) next.querySelector('#unpublish-session, #publish-session')?.focus();
  }
}
