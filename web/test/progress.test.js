import { afterEach, describe, expect, it, vi } from 'vitest';

import { Api, ApiError } from '../static/js/api.js';
import { TokenStore } from '../static/js/auth.js';
import { barChart, scoreLine } from '../static/js/chart.js';
import { percent, weekLabel } from '../static/js/format.js';
import { RATING_FAILED, RATING_NONE, RATING_PENDING, describeMetrics, ratingSection, scoreRows } from '../static/js/rating.js';
import { parseRoute } from '../static/js/router.js';
import { ProgressView, renderProgress, trendText } from '../static/js/views/progress.js';
import { SessionView } from '../static/js/views/session.js';

const EVIL = '<img src=x onerror="alert(1)">';

function scores(fluency, vocabulary, grammar, task) {
  return { fluency, vocabulary, grammar, task };
}

function container(...nodes) {
  const div = document.createElement('div');
  div.append(...nodes.filter(Boolean));
  return div;
}

describe('rating of a session', () => {
  it('shows nothing when no rating is expected, and says "no rating yet" when one is', () => {
    expect(ratingSection(null, { expected: false })).toBeNull();
    const el = ratingSection(null, { expected: true });
    expect(el.dataset.rating).toBe('none');
    expect(el.textContent).toContain(RATING_NONE);
    expect(el.querySelector('meter')).toBeNull();
  });

  it('pending: "Rating in progress", with the metrics measured so far', () => {
    const el = ratingSection({ status: 'pending', scores: {}, metrics: { words_per_minute: 98.4 }, feedback: '', model: '' });
    expect(el.dataset.rating).toBe('pending');
    expect(el.textContent).toContain(RATING_PENDING);
    expect(el.querySelector('[data-metric="words_per_minute"] dd').textContent).toBe('98 words per minute');
    expect(el.querySelector('meter')).toBeNull();
  });

  it('failed: says the recording and transcript are safe, shows no scores', () => {
    const el = ratingSection({ status: 'failed', scores: scores(90, 90, 90, 90), metrics: {}, feedback: 'x', model: 'm' });
    expect(el.dataset.rating).toBe('failed');
    expect(el.textContent).toContain(RATING_FAILED);
    expect(RATING_FAILED).toBe('Rating failed — your recording and transcript are safe');
    expect(el.querySelector('meter')).toBeNull();
    expect(el.querySelector('.feedback')).toBeNull();
  });

  it('done: the four scores as labelled bars, the overall score, the feedback and the metrics', () => {
    const rating = {
      status: 'done',
      scores: scores(80, 70, 60, 90),
      metrics: { words_per_minute: 112, filler_rate: 0.043, learner_talk_ratio: 0.58, vocabulary_variety: 0.62, response_latency_ms: 1240, long_pauses: 3 },
      feedback: 'Good pace.\nTry linking your sentences.',
      model: 'gpt-test',
    };
    const el = ratingSection(rating);
    expect(el.dataset.rating).toBe('done');
    expect(el.querySelector('h2').textContent).toBe('Rating: 75/100');
    const meters = [...el.querySelectorAll('meter')];
    expect(meters.map((m) => [m.getAttribute('aria-label'), m.getAttribute('value')])).toEqual([
      ['Fluency: 80 out of 100', '80'],
      ['Vocabulary: 70 out of 100', '70'],
      ['Grammar: 60 out of 100', '60'],
      ['Task: 90 out of 100', '90'],
    ]);
    expect(el.querySelector('.feedback').textContent).toBe(rating.feedback);
    const said = Object.fromEntries([...el.querySelectorAll('[data-metric]')].map((d) => [d.querySelector('dt').textContent, d.querySelector('dd').textContent]));
    expect(said).toEqual({
      'Speaking speed': '112 words per minute',
      'Your share of the talking': '58%',
      'Filler words': '4% of your words',
      'Vocabulary variety': '62% different words',
      'Time to answer': '1.2 s',
      'Long pauses (over 3 s)': '3 pauses',
    });
  });

  it('escapes everything that came from the server', () => {
    const el = ratingSection({ status: 'done', scores: scores(50, 50, 50, 50), metrics: {}, feedback: EVIL, model: EVIL });
    expect(el.querySelector('img')).toBeNull();
    expect(el.querySelector('.feedback').textContent).toBe(EVIL);
    expect(el.innerHTML).toContain('&lt;img');
  });

  it('ignores unknown metric keys and values that are not numbers', () => {
    const items = describeMetrics({ mystery_index: 4, coach_talk_ms: 1000, words_per_minute: 'fast', filler_rate: null, long_pauses: 1, [EVIL]: 2, learner_talk_ratio: Number.NaN });
    expect(items).toEqual([{ key: 'long_pauses', label: 'Long pauses (over 3 s)', text: '1 pause' }]);
    expect(describeMetrics(null)).toEqual([]);
    expect(describeMetrics('words_per_minute')).toEqual([]);
  });

  it('says talk time, words, turns and turn length in words', () => {
    const items = describeMetrics({ learner_talk_ms: 95000, learner_words: 180, learner_turns: 1, mean_utterance_words: 12.345 });
    expect(items.map((i) => [i.label, i.text])).toEqual([
      ['Your talk time', '1 min 35 s'],
      ['Words you said', '180 words'],
      ['Your turns', '1 turn'],
      ['Average turn', '12.3 words'],
    ]);
  });

  it('missing or out-of-range scores are shown as missing or clamped', () => {
    expect(scoreRows({ fluency: 120, vocabulary: -5, grammar: '70' }).map((r) => r.value)).toEqual([100, 0, null, null]);
    const el = ratingSection({ status: 'done', scores: { fluency: 70 }, metrics: {}, feedback: '', model: '' });
    expect(el.querySelectorAll('meter')).toHaveLength(1);
    expect(el.querySelector('[data-score="grammar"]').textContent).toContain('—');
  });
});

function week(weekIso, sessions, minutes, positive, s = scores(null, null, null, null)) {
  return { week: weekIso, sessions, minutes_spoken: minutes, positive_sessions: positive, scores: s };
}

const PROGRESS = {
  weeks: [
    week('2026-02-09', 1, 0.5, 0, scores(40, 40, 40, 40)),
    week('2026-02-16', 0, 0, 0),
    week('2026-02-23', 3, 1.8, 1, scores(57.5, 52.5, 55.5, 54.5)),
    week('2026-03-02', 3, 1.8, 1, scores(80, 70, 60, 90)),
  ],
  totals: {
    sessions: 7,
    minutes_spoken: 4.1,
    positive_sessions: 2,
    positive_share: 0.286,
    rated_sessions: 4,
    scores: scores(58.8, 53.8, 52.8, 59.8),
    trend: { fluency: 25, vocabulary: -3.5, grammar: 0, task: null },
  },
};

describe('progress page', () => {
  it('an empty answer is the empty state with a way to start', () => {
    const empty = {
      weeks: [week('2026-02-23', 0, 0, 0), week('2026-03-02', 0, 0, 0)],
      totals: { sessions: 0, minutes_spoken: 0, positive_sessions: 0, positive_share: null, rated_sessions: 0, scores: {}, trend: {} },
    };
    const el = container(...renderProgress(empty));
    expect(el.querySelector('#progress-empty').textContent).toContain('No finished sessions in the last 2 weeks yet.');
    expect(el.querySelector('#progress-empty a').getAttribute('href')).toBe('#/topics');
    expect(el.querySelector('svg')).toBeNull();
    expect(container(...renderProgress({})).querySelector('#progress-empty')).not.toBeNull();
  });

  it('shows the totals, one bar per week (zero weeks too), scores, trends and the week table', () => {
    const el = container(...renderProgress(PROGRESS, { locale: 'en-GB' }));
    const total = (key) => el.querySelector(`[data-total="${key}"]`).textContent;
    expect(total('sessions')).toBe('7');
    expect(total('minutes_spoken')).toBe('4.1 min');
    expect(total('positive')).toBe('29% (2 of 7)');
    expect(total('rated')).toBe('4 of 7');
    const bars = [...el.querySelectorAll('#progress-sessions rect.bar')];
    expect(bars.map((b) => b.getAttribute('data-value'))).toEqual(['1', '0', '3', '3']);
    expect(bars[1].classList.contains('zero')).toBe(true);
    expect(bars[2].querySelector('title').textContent).toBe('Week of 23 Feb: 3 sessions, 1 rated positively');
    expect(el.querySelector('#progress-sessions svg').getAttribute('aria-label')).toBe('Sessions per week over the last 4 weeks: 7 in all, at most 3 in one week.');
    expect([...el.querySelectorAll('#progress-minutes rect.bar')].map((b) => b.getAttribute('data-value'))).toEqual(['0.5', '0', '1.8', '1.8']);
    const trend = (key) => el.querySelector(`[data-trend="${key}"]`);
    expect(trend('fluency').textContent).toBe('Up 25 on the 4 weeks before');
    expect(trend('fluency').className).toBe('trend up');
    expect(trend('vocabulary').textContent).toBe('Down 3.5 on the 4 weeks before');
    expect(trend('grammar').textContent).toBe('Same as the 4 weeks before');
    expect(trend('task').textContent).toBe('Not enough ratings yet to compare');
    expect(el.querySelector('[data-dimension="fluency"] .score-value').textContent).toBe('58.8');
    // The week without a score breaks the line instead of drawing a zero.
    expect(el.querySelectorAll('[data-dimension="fluency"] polyline')).toHaveLength(1);
    expect(el.querySelectorAll('[data-dimension="fluency"] line.dot')).toHaveLength(1);
    const rows = [...el.querySelectorAll('#progress-table tbody tr')];
    expect(rows.map((r) => r.dataset.week)).toEqual(['2026-03-02', '2026-02-23', '2026-02-16', '2026-02-09']);
    expect([...rows[0].children].map((c) => c.textContent)).toEqual(['2 Mar', '3', '1.8', '1']);
  });

  it('escapes what came from the server', () => {
    const data = structuredClone(PROGRESS);
    data.weeks[0].week = EVIL;
    data.totals.minutes_spoken = EVIL;
    const el = container(...renderProgress(data));
    expect(el.querySelector('img')).toBeNull();
    expect(el.textContent).toContain(EVIL);
  });

  it('trend words', () => {
    expect(trendText(4.5)).toBe('Up 4.5 on the 4 weeks before');
    expect(trendText(-1)).toBe('Down 1 on the 4 weeks before');
    expect(trendText(0)).toBe('Same as the 4 weeks before');
    expect(trendText(null)).toBe('Not enough ratings yet to compare');
    expect(trendText('7')).toBe('Not enough ratings yet to compare');
  });

  it('charts scale to the largest value and have no line when no week has a score', () => {
    const chart = barChart([{ label: 'a', value: 2 }, { label: 'b', value: 4 }], { summary: 's' });
    const heights = [...chart.querySelectorAll('rect')].map((r) => Number(r.getAttribute('height')));
    expect(heights[1]).toBeCloseTo(heights[0] * 2, 0);
    expect(chart.getAttribute('role')).toBe('img');
    expect(scoreLine([null, null])).toBeNull();
  });

  it('formats shares and week names', () => {
    expect(percent(0.286)).toBe('29%');
    expect(percent(null)).toBe('—');
    expect(weekLabel('2026-03-02', 'en-GB')).toBe('2 Mar');
  });

  it('is reachable at #/progress', () => {
    expect(parseRoute('#/progress')).toEqual({ name: 'progress' });
  });
});

describe('progress view', () => {
  function view(progress) {
    const root = document.createElement('section');
    const ctx = { api: { progress: vi.fn(progress) } };
    return { v: new ProgressView(ctx, root), root, ctx };
  }

  it('loads the chosen number of weeks and renders the answer', async () => {
    const { v, root, ctx } = view(async () => PROGRESS);
    await v.show();
    expect(ctx.api.progress).toHaveBeenCalledWith({ weeks: 12 });
    expect(root.querySelector('#progress-totals')).not.toBeNull();
    expect(root.querySelector('#progress-status').textContent).toBe('');
    root.querySelector('#progress-weeks').value = '26';
    await v.load();
    expect(ctx.api.progress).toHaveBeenLastCalledWith({ weeks: 26 });
  });

  it('an error says what happened and offers to try again', async () => {
    let fail = true;
    const { v, root, ctx } = view(async () => {
      if (fail) throw new ApiError({ status: 503, code: 'storage_unavailable' });
      return PROGRESS;
    });
    await v.show();
    const error = root.querySelector('#progress-error');
    expect(error.getAttribute('role')).toBe('alert');
    expect(error.textContent).toContain('Parley is having trouble on its side.');
    fail = false;
    error.querySelector('button').click();
    await vi.waitFor(() => expect(root.querySelector('#progress-totals')).not.toBeNull());
    expect(ctx.api.progress).toHaveBeenCalledTimes(2);
    expect(root.querySelector('#progress-error')).toBeNull();
  });

  it('an older answer never replaces a newer one', async () => {
    let release;
    const calls = [];
    const { v, root } = view((args) => {
      calls.push(args.weeks);
      return calls.length === 1 ? new Promise((r) => { release = () => r(PROGRESS); }) : Promise.resolve({ weeks: [], totals: { sessions: 0 } });
    });
    const first = v.show();
    root.querySelector('#progress-weeks').value = '4';
    await v.load();
    release();
    await first;
    expect(root.querySelector('#progress-empty')).not.toBeNull();
    expect(root.querySelector('#progress-totals')).toBeNull();
  });
});

describe('api client', () => {
  function memoryStorage() {
    const data = new Map();
    return { getItem: (k) => data.get(k) ?? null, setItem: (k, v) => data.set(k, String(v)), removeItem: (k) => data.delete(k) };
  }

  it('GET /v1/me/progress with ?weeks= and the Bearer header', async () => {
    const tokens = new TokenStore({ storage: memoryStorage() });
    tokens.save({ access_token: 'tok-1', expires_in: 3600 }, { email: 'a@example.org', userId: 'u1' });
    const calls = [];
    const fetch = vi.fn(async (url, init) => {
      calls.push({ url, init });
      return new Response(JSON.stringify(PROGRESS), { status: 200, headers: { 'Content-Type': 'application/json' } });
    });
    const api = new Api({ tokens, fetch });
    expect(await api.progress()).toEqual(PROGRESS);
    await api.progress({ weeks: 4 });
    expect(calls.map((c) => c.url)).toEqual(['/v1/me/progress?weeks=12', '/v1/me/progress?weeks=4']);
    expect(calls[0].init.method).toBe('GET');
    expect(calls[0].init.headers.Authorization).toBe('Bearer tok-1');
  });

  it('a problem answer becomes an ApiError with the field', async () => {
    const tokens = new TokenStore({ storage: memoryStorage() });
    tokens.save({ access_token: 'tok-1', expires_in: 3600 }, {});
    const body = { type: 't', title: 'Unprocessable Content', status: 422, detail: 'weeks: must be an integer from 1 to 104', code: 'invalid_request', field: 'weeks' };
    const fetch = async () => new Response(JSON.stringify(body), { status: 422, headers: { 'Content-Type': 'application/problem+json' } });
    await expect(new Api({ tokens, fetch }).progress({ weeks: 0 })).rejects.toMatchObject({ status: 422, code: 'invalid_request', field: 'weeks' });
  });
});

describe('session view rating', () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  function session(status, rating) {
    return { id: 'ses_1', topic_id: 't', status, visibility: 'private', created_at: '2026-03-02T10:00:00Z', started_at: '2026-03-02T10:00:00Z', duration_ms: 60000, audio: [], rating };
  }

  function sessionView(answers) {
    const root = document.createElement('section');
    const getSession = vi.fn(async () => answers.shift());
    const ctx = { api: { getSession, transcript: async () => [] }, topics: { byId: async () => new Map() } };
    return { v: new SessionView(ctx, root), root, getSession };
  }

  it('a pending rating turns into the done one without a reload, then the page stops asking', async () => {
    vi.useFakeTimers();
    const pending = { status: 'pending', scores: {}, metrics: {}, feedback: '', model: '' };
    const done = { status: 'done', scores: scores(80, 70, 60, 90), metrics: {}, feedback: 'Well done.', model: 'm' };
    const { v, root, getSession } = sessionView([session('processing', pending), session('processing', pending), session('processed', done)]);
    await v.show({ id: 'ses_1' });
    expect(root.querySelector('#session-rating').dataset.rating).toBe('pending');
    await vi.advanceTimersByTimeAsync(4000);
    expect(root.querySelector('#session-rating').dataset.rating).toBe('pending');
    await vi.advanceTimersByTimeAsync(4000);
    expect(root.querySelector('#session-rating').dataset.rating).toBe('done');
    expect(root.querySelector('[data-fact="status"]').textContent).toBe('Ready');
    expect(root.querySelector('.feedback').textContent).toBe('Well done.');
    await vi.advanceTimersByTimeAsync(20000);
    expect(getSession).toHaveBeenCalledTimes(3);
    v.hide();
  });

  it('leaving the page stops the checks; a session that never went live shows no rating', async () => {
    vi.useFakeTimers();
    const { v, root, getSession } = sessionView([session('ended', null), session('failed', null)]);
    await v.show({ id: 'ses_1' });
    expect(root.querySelector('#session-rating').textContent).toContain(RATING_NONE);
    v.hide();
    await vi.advanceTimersByTimeAsync(20000);
    expect(getSession).toHaveBeenCalledTimes(1);
    await v.show({ id: 'ses_1' });
    expect(root.querySelector('#session-rating')).toBeNull();
  });
});
