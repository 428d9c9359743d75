/** Formatting of times and numbers for people. Pure. */

/** 65000 -> "1:05"; 3725000 -> "1:02:05". */
export function clock(ms) {
  const total = Math.max(0, Math.floor((Number(ms) || 0) / 1000));
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const seconds = String(total % 60).padStart(2, '0');
  return hours > 0 ? `${hours}:${String(minutes).padStart(2, '0')}:${seconds}` : `${minutes}:${seconds}`;
}

/** A duration in words: "45 s", "3 min 05 s", "1 h 02 min"; "—" when unknown. */
export function duration(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(Number(ms))) return '—';
  const total = Math.round(Number(ms) / 1000);
  if (total < 60) return `${total} s`;
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  if (hours > 0) return `${hours} h ${String(minutes).padStart(2, '0')} min`;
  return `${minutes} min ${String(total % 60).padStart(2, '0')} s`;
}

/** An RFC 3339 time as a short local date and time; "—" when missing. */
export function when(iso, locale = undefined) {
  if (!iso) return '—';
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return '—';
  return date.toLocaleString(locale, { dateStyle: 'medium', timeStyle: 'short' });
}

/** The overall score of a Rating (mean of its scores), or null when there is none yet. */
export function overallScore(rating) {
  if (!rating || rating.status !== 'done' || !rating.scores) return null;
  const values = Object.values(rating.scores).filter((v) => Number.isFinite(v));
  if (values.length === 0) return null;
  return Math.round(values.reduce((a, b) => a + b, 0) / values.length);
}

/** Capitalise the first letter ("beginner" -> "Beginner"). */
export function title(text) {
  const s = String(text ?? '');
  return s.charAt(0).toUpperCase() + s.slice(1);
}

/** 0.286 -> "29%"; null (or not a number) -> "—". */
export function percent(fraction) {
  const n = Number(fraction);
  if (fraction === null || fraction === undefined || !Number.isFinite(n)) return '—';
  return `${Math.round(n * 100)}%`;
}

/** A week named by its Monday ("2026-03-02") as a short date ("Mar 2" in US English); UTC, as the weeks are. */
export function weekLabel(isoDate, locale = undefined) {
  const date = new Date(`${isoDate}T00:00:00Z`);
  if (Number.isNaN(date.getTime())) return String(isoDate ?? '');
  return date.toLocaleDateString(locale, { day: 'numeric', month: 'short', timeZone: 'UTC' });
}
