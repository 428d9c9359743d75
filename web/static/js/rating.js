/**
 * A session's Rating (API.md) for the learner: the four scores as labelled bars, the coach's
 * feedback, and the measured metrics in plain words. Pure functions of the data; text only ever
 * goes in as text, so nothing in a rating can become markup.
 */

import { h } from './dom.js';
import { duration, overallScore } from './format.js';

/** The four scores of a Rating, in the order shown, with the learner's names for them. */
export const DIMENSIONS = [
  ['fluency', 'Fluency'],
  ['vocabulary', 'Vocabulary'],
  ['grammar', 'Grammar'],
  ['task', 'Task'],
];

export const RATING_PENDING = 'Rating in progress';
export const RATING_FAILED = 'Rating failed — your recording and transcript are safe';
export const RATING_NONE = 'No rating yet';

const round1 = (v) => Math.round(v * 10) / 10;
const pct = (fraction) => `${Math.round(fraction * 100)}%`;
const seconds = (s) => `${round1(s)} s`;
const count = (n, one, many) => (Math.round(n) === 1 ? `1 ${one}` : `${Math.round(n)} ${many}`);

/**
 * The metrics the client knows how to say, in the order shown (the rating step's names, see
 * relay/worker/speech.py); ratios are fractions from 0 to 1. Other keys are not shown.
 */
const METRICS = [
  ['words_per_minute', 'Speaking speed', (v) => `${Math.round(v)} words per minute`],
  ['learner_talk_ms', 'Your talk time', (v) => duration(v)],
  ['learner_talk_ratio', 'Your share of the talking', pct],
  ['learner_words', 'Words you said', (v) => count(v, 'word', 'words')],
  ['learner_turns', 'Your turns', (v) => count(v, 'turn', 'turns')],
  ['mean_utterance_words', 'Average turn', (v) => `${round1(v)} words`],
  ['filler_rate', 'Filler words', (v) => `${pct(v)} of your words`],
  ['vocabulary_variety', 'Vocabulary variety', (v) => `${pct(v)} different words`],
  ['response_latency_ms', 'Time to answer', (v) => seconds(v / 1000)],
  ['long_pauses', 'Long pauses (over 3 s)', (v) => count(v, 'pause', 'pauses')],
];

function finite(value) {
  return typeof value === 'number' && Number.isFinite(value);
}

/** The known metrics of `metrics` as `[{key, label, text}]`; unknown keys and non-numbers are skipped. */
export function describeMetrics(metrics) {
  if (!metrics || typeof metrics !== 'object') return [];
  return METRICS.filter(([key]) => Object.hasOwn(metrics, key) && finite(metrics[key])).map(([key, label, say]) => ({ key, label, text: say(metrics[key]) }));
}

/** The four scores as `[{key, label, value}]`, `value` a number 0..100 or null when missing. */
export function scoreRows(scores) {
  return DIMENSIONS.map(([key, label]) => {
    const v = scores && finite(scores[key]) ? Math.min(100, Math.max(0, scores[key])) : null;
    return { key, label, value: v };
  });
}

function scoreBars(scores) {
  return h(
    'ul',
    { class: 'scores', 'aria-label': 'Scores out of 100' },
    ...scoreRows(scores).map(({ key, label, value }) =>
      h(
        'li',
        { class: 'score', dataset: { score: key } },
        h('span', { class: 'score-label', text: label }),
        value === null
          ? h('span', { class: 'muted', text: '—' })
          : h('meter', { min: '0', max: '100', low: '40', high: '70', optimum: '100', value: String(value), 'aria-label': `${label}: ${Math.round(value)} out of 100` }),
        h('span', { class: 'score-value', text: value === null ? '' : String(Math.round(value)) }),
      ),
    ),
  );
}

function metricList(metrics) {
  const items = describeMetrics(metrics);
  if (items.length === 0) return null;
  return h(
    'dl',
    { class: 'facts metrics', 'aria-label': 'How you spoke' },
    ...items.map(({ key, label, text }) => h('div', { dataset: { metric: key } }, h('dt', { text: label }), h('dd', { text }))),
  );
}

/**
 * The rating card of a session. `rating`: a Rating or null. `expected`: whether a rating is to be
 * expected at all (the session went live and ended); with no rating and nothing expected, nothing
 * is shown. The card's `data-rating` says which state it shows: none, pending, failed or done.
 */
export function ratingSection(rating, { expected = true } = {}) {
  const state = rating ? (['pending', 'done', 'failed'].includes(rating.status) ? rating.status : 'failed') : 'none';
  if (state === 'none' && !expected) return null;
  const section = h('section', { class: 'card rating', id: 'session-rating', 'aria-labelledby': 'rating-title', dataset: { rating: state } });
  const heading = h('h2', { id: 'rating-title', text: 'Rating' });
  section.append(heading);
  if (state === 'none') {
    section.append(h('p', { class: 'muted', role: 'status', text: `${RATING_NONE}. Sessions are rated shortly after they end.` }));
    return section;
  }
  if (state === 'pending') {
    section.append(h('p', { class: 'muted', role: 'status', text: `${RATING_PENDING}…` }));
  } else if (state === 'failed') {
    section.append(h('p', { class: 'notice warning', role: 'status', text: `${RATING_FAILED}.` }));
  } else {
    const overall = overallScore(rating);
    if (overall !== null) heading.textContent = `Rating: ${overall}/100`;
    section.append(scoreBars(rating.scores));
    if (typeof rating.feedback === 'string' && rating.feedback.trim()) {
      section.append(h('h3', { text: 'Feedback' }), h('p', { class: 'feedback', text: rating.feedback }));
    }
  }
  const metrics = metricList(rating.metrics);
  if (metrics) section.append(h('h3', { text: 'How you spoke' }), metrics);
  return section;
}
