/**
 * Hash routes: `#/signin`, `#/topics`, `#/call`, `#/history`, `#/progress`, `#/sessions/<id>`.
 * The hash holds only where the learner is, never a token. Other hashes (`#main`) are not routes.
 */

export function parseRoute(hash) {
  const path = String(hash ?? '').replace(/^#/, '');
  if (path === '') return { name: 'home' };
  if (!path.startsWith('/')) return null;
  const parts = path.slice(1).split('/').filter(Boolean).map(decodeURIComponent);
  if (parts.length === 0) return { name: 'home' };
  if (parts[0] === 'sessions' && parts.length === 2) return { name: 'session', id: parts[1] };
  if (parts.length === 1 && ['signin', 'topics', 'call', 'history', 'progress'].includes(parts[0])) return { name: parts[0] };
  return { name: 'notfound' };
}

export function sessionHref(id) {
  return `#/sessions/${encodeURIComponent(id)}`;
}
