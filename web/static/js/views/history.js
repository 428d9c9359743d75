/** The learner's sessions, newest first: topic, when, status, duration, rating, visibility. */

import { h, replace } from '../dom.js';
import { duration, overallScore, when } from '../format.js';
import { apiErrorMessage, statusLabel } from '../messages.js';
import { sessionHref } from '../router.js';

export class HistoryView {
  constructor(ctx, root) {
    this.ctx = ctx;
    this.root = root;
    this.heading = h('h1', { tabindex: '-1', text: 'Your sessions' });
    this.status = h('p', { class: 'muted', role: 'status' });
    this.list = h('ul', { class: 'history', id: 'history-list', 'aria-label': 'Sessions' });
    this.more = h('button', { type: 'button', class: 'secondary', hidden: true, text: 'Show older sessions', onclick: () => this.load(this.cursor) });
    replace(this.root, this.heading, this.status, this.list, this.more);
  }

  focusTarget() {
    return this.heading;
  }

  async show() {
    replace(this.list);
    this.cursor = null;
    await this.load(null);
  }

  async load(cursor) {
    this.status.textContent = 'Loading your sessions…';
    this.more.disabled = true;
    let page;
    let topics;
    try {
      [page, topics] = await Promise.all([this.ctx.api.listSessions({ cursor }), this.ctx.topics.byId()]);
    } catch (err) {
      this.status.textContent = apiErrorMessage(err, 'load');
      this.more.disabled = false;
      return;
    }
    for (const session of page.sessions) this.list.append(this.item(session, topics));
    this.cursor = page.next_cursor;
    this.more.hidden = !this.cursor;
    this.more.disabled = false;
    if (this.list.children.length === 0) {
      this.status.replaceChildren('No sessions yet. ', h('a', { href: '#/topics', text: 'Pick a topic to start one.' }));
    } else {
      this.status.textContent = '';
    }
  }

  item(session, topics) {
    const topic = topics.get(session.topic_id);
    const name = topic ? topic.title : session.topic_id;
    const score = overallScore(session.rating);
    let rating = null;
    if (score !== null) rating = `${score}/100`;
    else if (session.rating?.status === 'pending') rating = 'being rated';
    return h(
      'li',
      { class: 'card history-item', dataset: { sessionId: session.id, status: session.status } },
      h('a', { href: sessionHref(session.id), class: 'history-link' }, h('span', { class: 'history-title', text: name }), h('span', { class: 'muted', text: when(session.started_at ?? session.created_at) })),
      h(
        'dl',
        { class: 'facts' },
        h('div', {}, h('dt', { text: 'Status' }), h('dd', { class: `status status-${session.status}`, text: statusLabel(session.status) })),
        h('div', {}, h('dt', { text: 'Length' }), h('dd', { text: duration(session.duration_ms) })),
        rating ? h('div', {}, h('dt', { text: 'Rating' }), h('dd', { text: rating })) : null,
        session.visibility === 'public' ? h('div', {}, h('dt', { text: 'Visibility' }), h('dd', { text: 'Public' })) : null,
      ),
    );
  }
}
