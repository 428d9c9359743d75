/**
 * The learner's progress (GET /v1/me/progress): sessions and minutes spoken per week, the share
 * of sessions rated positively, and each score's average and trend. {@link renderProgress} is a
 * pure function of the answer; the view only loads it and shows loading, empty and error states.
 */

import { barChart, scoreLine } from '../chart.js';
import { h, replace } from '../dom.js';
import { percent, weekLabel } from '../format.js';
import { apiErrorMessage } from '../messages.js';
import { DIMENSIONS } from '../rating.js';

export const WEEK_CHOICES = [4, 12, 26, 52];
export const DEFAULT_WEEKS = 12;

const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;
const num = (v) => (typeof v === 'number' && Number.isFinite(v) ? v : null);

/** A trend (score points, last 4 weeks against the 4 before) in words; null: not enough ratings. */
export function trendText(delta) {
  const d = num(delta);
  if (d === null) return 'Not enough ratings yet to compare';
  if (d > 0) return `Up ${d} on the 4 weeks before`;
  if (d < 0) return `Down ${Math.abs(d)} on the 4 weeks before`;
  return 'Same as the 4 weeks before';
}

function trendClass(delta) {
  const d = num(delta);
  if (d === null || d === 0) return 'trend';
  return d > 0 ? 'trend up' : 'trend down';
}

function fact(label, value, key) {
  return h('div', {}, h('dt', { text: label }), h('dd', { text: value, dataset: { total: key } }));
}

function chartCard(id, titleText, chart, weeks, locale) {
  const first = weeks[0];
  return h(
    'section',
    { class: 'card', id, 'aria-labelledby': `${id}-title` },
    h('h2', { id: `${id}-title`, text: titleText }),
    chart,
    first ? h('p', { class: 'chart-scale muted', 'aria-hidden': 'true' }, h('span', { text: weekLabel(first.week, locale) }), h('span', { text: 'This week' })) : null,
  );
}

function scoresCard(weeks, totals) {
  const rows = DIMENSIONS.map(([key, label]) => {
    const mean = num(totals.scores?.[key]);
    const delta = totals.trend?.[key];
    const line = scoreLine(
      weeks.map((w) => num(w.scores?.[key])),
      { summary: `${label} per week` },
    );
    return h(
      'li',
      { class: 'trend-row', dataset: { dimension: key } },
      h('span', { class: 'score-label', text: label }),
      h('span', { class: 'score-value', text: mean === null ? '—' : String(mean) }),
      h('span', { class: trendClass(delta), dataset: { trend: key }, text: trendText(delta) }),
      line,
    );
  });
  return h(
    'section',
    { class: 'card', id: 'progress-scores', 'aria-labelledby': 'progress-scores-title' },
    h('h2', { id: 'progress-scores-title', text: 'Scores' }),
    totals.rated_sessions
      ? h('p', { class: 'muted', text: `Averages out of 100 over ${plural(totals.rated_sessions, 'rated session', 'rated sessions')}.` })
      : h('p', { class: 'muted', text: 'No rated sessions in these weeks yet.' }),
    h('ul', { class: 'trends', 'aria-label': 'Scores and trends' }, ...rows),
  );
}

function weekTable(weeks, locale) {
  const rows = [...weeks].reverse().map((w) =>
    h(
      'tr',
      { dataset: { week: w.week } },
      h('th', { scope: 'row', text: weekLabel(w.week, locale) }),
      h('td', { text: String(w.sessions ?? 0) }),
      h('td', { text: (num(w.minutes_spoken) ?? 0).toFixed(1) }),
      h('td', { text: String(w.positive_sessions ?? 0) }),
    ),
  );
  return h(
    'details',
    { class: 'card' },
    h('summary', { text: 'Week by week' }),
    h(
      'div',
      { class: 'table-scroll' },
      h(
        'table',
        { class: 'weeks', id: 'progress-table' },
        h('thead', {}, h('tr', {}, ...['Week', 'Sessions', 'Minutes', 'Positive'].map((t) => h('th', { scope: 'col', text: t })))),
        h('tbody', {}, ...rows),
      ),
    ),
  );
}

/**
 * The page body for a progress answer, as a list of nodes: the totals, two weekly charts, the
 * scores with their trends, and a week-by-week table; or the empty state when there is no session.
 */
export function renderProgress(data, { locale = undefined } = {}) {
  const weeks = Array.isArray(data?.weeks) ? data.weeks : [];
  const totals = data?.totals ?? {};
  const span = plural(weeks.length, 'week', 'weeks');
  if (!totals.sessions) {
    return [
      h(
        'p',
        { class: 'card', id: 'progress-empty' },
        `No finished sessions in the last ${span} yet. `,
        h('a', { href: '#/topics', text: 'Pick a topic to start one.' }),
      ),
    ];
  }
  const share = num(totals.positive_share);
  const summary = h(
    'dl',
    { class: 'facts card', id: 'progress-totals', 'aria-label': `The last ${span}` },
    fact('Sessions', String(totals.sessions), 'sessions'),
    fact('Minutes spoken', `${totals.minutes_spoken ?? 0} min`, 'minutes_spoken'),
    fact('Rated positively', share === null ? '—' : `${percent(share)} (${totals.positive_sessions ?? 0} of ${totals.sessions})`, 'positive'),
    fact('Rated', `${totals.rated_sessions ?? 0} of ${totals.sessions}`, 'rated'),
  );
  const most = (key) => Math.max(0, ...weeks.map((w) => num(w[key]) ?? 0));
  const sessions = barChart(
    weeks.map((w) => ({
      label: weekLabel(w.week, locale),
      value: num(w.sessions) ?? 0,
      title: `Week of ${weekLabel(w.week, locale)}: ${plural(w.sessions ?? 0, 'session', 'sessions')}, ${w.positive_sessions ?? 0} rated positively`,
    })),
    { summary: `Sessions per week over the last ${span}: ${totals.sessions} in all, at most ${most('sessions')} in one week.` },
  );
  const minutes = barChart(
    weeks.map((w) => ({
      label: weekLabel(w.week, locale),
      value: num(w.minutes_spoken) ?? 0,
      title: `Week of ${weekLabel(w.week, locale)}: ${w.minutes_spoken ?? 0} min spoken`,
    })),
    { summary: `Minutes spoken per week over the last ${span}: ${totals.minutes_spoken ?? 0} in all, at most ${most('minutes_spoken')} in one week.` },
  );
  return [
    summary,
    chartCard('progress-sessions', 'Sessions per week', sessions, weeks, locale),
    chartCard('progress-minutes', 'Minutes spoken per week', minutes, weeks, locale),
    scoresCard(weeks, totals),
    weekTable(weeks, locale),
  ];
}

export class ProgressView {
  constructor(ctx, root) {
    this.ctx = ctx;
    this.root = root;
    this.loading = null;
    this.heading = h('h1', { tabindex: '-1', text: 'Your progress' });
    this.weeks = h(
      'select',
      { id: 'progress-weeks', onchange: () => this.load() },
      ...WEEK_CHOICES.map((n) => h('option', { value: String(n), selected: n === DEFAULT_WEEKS, text: `Last ${n} weeks` })),
    );
    this.status = h('p', { class: 'muted', role: 'status', id: 'progress-status' });
    this.body = h('div', { id: 'progress-body' });
    replace(
      this.root,
      this.heading,
      h('div', { class: 'filter' }, h('label', { for: 'progress-weeks', text: 'Show' }), this.weeks),
      this.status,
      this.body,
    );
  }

  focusTarget() {
    return this.heading;
  }

  show() {
    return this.load();
  }

  async load() {
    const token = (this.loading = {});
    this.status.textContent = 'Loading your progress…';
    replace(this.body);
    let data;
    try {
      data = await this.ctx.api.progress({ weeks: Number(this.weeks.value) || DEFAULT_WEEKS });
    } catch (err) {
      if (this.loading !== token) return;
      this.status.textContent = '';
      replace(
        this.body,
        h(
          'div',
          { class: 'notice error', role: 'alert', id: 'progress-error' },
          `${apiErrorMessage(err, 'load')} `,
          h('button', { type: 'button', class: 'link', text: 'Try again', onclick: () => this.load() }),
        ),
      );
      return;
    }
    if (this.loading !== token) return; // a newer load (another week choice) is under way
    this.status.textContent = '';
    replace(this.body, ...renderProgress(data));
  }
}
