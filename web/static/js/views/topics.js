/** The topic picker: title, difficulty, what to talk about, hints; Start. */

import { h, replace } from '../dom.js';
import { title } from '../format.js';
import { apiErrorMessage } from '../messages.js';

const LEVELS = ['beginner', 'intermediate', 'advanced'];

export class TopicsView {
  constructor(ctx, root) {
    this.ctx = ctx;
    this.root = root;
    this.filter = 'all';
    this.heading = h('h1', { tabindex: '-1', text: 'Pick a topic' });
    this.select = h(
      'select',
      { id: 'difficulty-filter', onchange: () => this.setFilter(this.select.value) },
      h('option', { value: 'all', text: 'All levels' }),
      ...LEVELS.map((level) => h('option', { value: level, text: title(level) })),
    );
    this.status = h('p', { class: 'muted', role: 'status' });
    this.list = h('ul', { class: 'topics', 'aria-label': 'Topics' });
    replace(
      this.root,
      this.heading,
      h('p', { class: 'lead', text: 'Choose something to talk about. Once the session is live, say hello: the coach answers when you pause.' }),
      h('div', { class: 'filter' }, h('label', { for: 'difficulty-filter', text: 'Level' }), this.select),
      this.status,
      this.list,
    );
  }

  focusTarget() {
    return this.heading;
  }

  setFilter(value) {
    this.filter = value;
    this.render();
  }

  async show() {
    if (!this.topics) {
      this.status.textContent = 'Loading topics…';
      try {
        this.topics = await this.ctx.topics.all();
        this.status.textContent = '';
      } catch (err) {
        this.status.textContent = apiErrorMessage(err, 'load');
        return;
      }
    }
    this.render();
  }

  render() {
    const topics = (this.topics ?? []).filter((t) => this.filter === 'all' || t.difficulty === this.filter);
    const busy = this.ctx.controller.active;
    replace(
      this.list,
      ...topics.map((topic) => {
        const titleId = `topic-${topic.id}-title`;
        return h(
          'li',
          { class: 'card topic', 'aria-labelledby': titleId, dataset: { topicId: topic.id } },
          h('div', { class: 'topic-head' }, h('h2', { id: titleId, text: topic.title }), h('span', { class: `badge level-${topic.difficulty}`, text: title(topic.difficulty) })),
          topic.prompts?.length
            ? h('div', {}, h('h3', { text: 'Talk about' }), h('ul', { class: 'prompts' }, ...topic.prompts.map((p) => h('li', { text: p }))))
            : null,
          topic.hints?.length
            ? h('details', { class: 'hints' }, h('summary', { text: 'Hints' }), h('ul', {}, ...topic.hints.map((p) => h('li', { text: p }))))
            : null,
          h('button', {
            type: 'button',
            class: 'primary start',
            disabled: busy,
            'aria-describedby': titleId,
            text: 'Start talking',
            onclick: () => this.ctx.startCall(topic),
          }),
        );
      }),
    );
    if (busy) this.status.textContent = 'A session is running. End it before starting another.';
    else if (topics.length === 0) this.status.textContent = 'No topics at this level yet.';
    else this.status.textContent = '';
  }
}
