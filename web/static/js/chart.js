/**
 * Two tiny inline-SVG charts, no library: weekly bars and a score line. Sizes are in the SVG's own
 * units (the stylesheet scales it to the card's width); each chart has a text alternative, and
 * every bar a `<title>` the browser shows on hover.
 */

import { svg } from './dom.js';

const WIDTH = 320;
const BAR_HEIGHT = 96;
const LINE_HEIGHT = 48;

/**
 * Bars, one per item `{label, value, title}` (value >= 0), scaled to the largest (at least `min`).
 * `summary` is what a screen reader hears instead of the picture.
 */
export function barChart(items, { summary, min = 1 } = {}) {
  const base = BAR_HEIGHT - 2; // room for the baseline's stroke
  const top = Math.max(min, ...items.map((i) => (Number.isFinite(i.value) ? i.value : 0)));
  const slot = WIDTH / Math.max(1, items.length);
  const gap = Math.min(4, slot * 0.2);
  const bars = items.map((item, index) => {
    const value = Number.isFinite(item.value) && item.value > 0 ? item.value : 0;
    // A zero week still gets a hairline, so the series reads as continuous.
    const height = value === 0 ? 1 : Math.max(2, (value / top) * (base - 4));
    return svg(
      'rect',
      {
        class: value === 0 ? 'bar zero' : 'bar',
        x: (index * slot + gap / 2).toFixed(1),
        y: (base - height).toFixed(1),
        width: Math.max(1, slot - gap).toFixed(1),
        height: height.toFixed(1),
        'data-value': String(value),
      },
      svg('title', { text: item.title ?? `${item.label}: ${value}` }),
    );
  });
  return svg(
    'svg',
    { class: 'chart', viewBox: `0 0 ${WIDTH} ${BAR_HEIGHT}`, role: 'img', 'aria-label': summary ?? '' },
    svg('line', { class: 'axis', x1: '0', y1: String(base), x2: String(WIDTH), y2: String(base) }),
    ...bars,
  );
}

/**
 * A line through the weeks that have a score (0..100); weeks without one leave a gap in the line
 * rather than a fake zero. Answers null when no week has a score.
 */
export function scoreLine(values, { summary } = {}) {
  const base = LINE_HEIGHT - 4;
  const slot = WIDTH / Math.max(1, values.length);
  const points = values.map((v, i) =>
    Number.isFinite(v) ? { x: i * slot + slot / 2, y: base - (Math.min(100, Math.max(0, v)) / 100) * (base - 4) } : null,
  );
  if (points.every((p) => p === null)) return null;
  const runs = [];
  let run = [];
  for (const p of points) {
    if (p === null) {
      if (run.length) runs.push(run);
      run = [];
    } else run.push(p);
  }
  if (run.length) runs.push(run);
  const shapes = runs.map((r) =>
    r.length === 1
      ? // A zero-length line with round caps: a dot that stays round however the chart is stretched.
        svg('line', { class: 'dot', x1: r[0].x.toFixed(1), y1: r[0].y.toFixed(1), x2: r[0].x.toFixed(1), y2: r[0].y.toFixed(1) })
      : svg('polyline', { class: 'line', points: r.map((p) => `${p.x.toFixed(1)},${p.y.toFixed(1)}`).join(' ') }),
  );
  return svg(
    'svg',
    // Stretched to the card's width at a fixed height; strokes keep their width (non-scaling-stroke).
    { class: 'chart spark', viewBox: `0 0 ${WIDTH} ${LINE_HEIGHT}`, role: 'img', 'aria-label': summary ?? '', preserveAspectRatio: 'none' },
    ...shapes,
  );
}
