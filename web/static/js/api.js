/**
 * The HTTP side of API.md: one method per operation, errors as {@link ApiError}.
 *
 * Every call with the access token goes through {@link Api#request}. A 401 there asks
 * `onAuthRequired()` (the sign-in dialog) for a new token and retries once it has one, so an
 * expired token never loses the page the learner is on. Concurrent 401s share one prompt.
 */

import { retryAfterMs } from './backoff.js';

/** A failed call: HTTP status (0 for a network failure), the problem's stable `code`, its `detail`. */
export class ApiError extends Error {
  constructor({ status = 0, code = 'error', detail = '', title = '', field = null, retryAfterMs: wait = null } = {}) {
    super(detail || title || code);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.title = title;
    this.field = field;
    this.retryAfterMs = wait;
  }

  get network() {
    return this.status === 0;
  }
}

const CLIENT_SECRET_CODES = new Set(['client_secret_expired', 'client_secret_used', 'client_secret_invalid']);

/** True for a 401 about a WebRTC client secret (a fresh one helps), not about the access token. */
export function isClientSecretError(err) {
  return err instanceof ApiError && err.status === 401 && CLIENT_SECRET_CODES.has(err.code);
}

/** Read an error response (problem+json or anything else) into an ApiError. */
export async function errorFrom(response) {
  let body = null;
  try {
    const type = response.headers.get('Content-Type') || '';
    if (type.includes('json')) body = await response.json();
  } catch {
    body = null;
  }
  const retry = response.headers.get('Retry-After');
  return new ApiError({
    status: response.status,
    code: (body && typeof body.code === 'string' && body.code) || `http_${response.status}`,
    detail: (body && typeof body.detail === 'string' && body.detail) || '',
    title: (body && typeof body.title === 'string' && body.title) || response.statusText || '',
    field: (body && typeof body.field === 'string' && body.field) || null,
    retryAfterMs: retry === null ? null : retryAfterMs(retry),
  });
}

/** The file name of a `Content-Disposition: attachment; filename="..."` header, else `fallback`. */
export function attachmentName(header, fallback) {
  const match = /filename="?([^";]+)"?/i.exec(header || '');
  return match ? match[1] : fallback;
}

export class Api {
  /**
   * @param {object} options
   * @param {import('./auth.js').TokenStore} options.tokens
   * @param {() => Promise<boolean>} [options.onAuthRequired] resolves true once a new token is saved
   * @param {typeof fetch} [options.fetch]
   */
  constructor({ tokens, onAuthRequired = async () => false, fetch: fetchImpl = null, base = '' }) {
    this.tokens = tokens;
    this.onAuthRequired = onAuthRequired;
    this.fetch = fetchImpl ?? ((...args) => globalThis.fetch(...args));
    this.base = base;
    this.reauth = null;
  }

  /**
   * One request. `auth`: 'access' (the learner's token), 'none', or `{bearer}` (a client secret).
   * `expect`: 'json', 'text', 'blob', 'none' or 'response' (the raw Response, for headers).
   */
  async request(method, path, { json, body, headers = {}, auth = 'access', expect = 'json', keepalive = false } = {}) {
    for (let attempt = 0; ; attempt += 1) {
      const sent = { ...headers };
      let token = null;
      if (auth === 'access') {
        token = this.tokens.token;
        if (token === null) {
          if (!(await this.signInAgain())) throw new ApiError({ status: 401, code: 'signed_out' });
          token = this.tokens.token;
        }
        sent.Authorization = `Bearer ${token}`;
      } else if (auth && auth.bearer) {
        sent.Authorization = `Bearer ${auth.bearer}`;
      }
      let payload = body;
      if (json !== undefined) {
        sent['Content-Type'] = 'application/json';
        payload = JSON.stringify(json);
      }
      let response;
      try {
        response = await this.fetch(this.base + path, {
          method,
          headers: sent,
          body: payload,
          keepalive,
          cache: 'no-store',
          credentials: 'omit',
        });
      } catch {
        throw new ApiError({ status: 0, code: 'network', detail: 'The network request failed.' });
      }
      if (response.status === 401 && auth === 'access' && attempt === 0) {
        // The token ran out (or was revoked): sign in again, keep the page, then retry once.
        if (this.tokens.token === token && !(await this.signInAgain())) {
          throw await errorFrom(response);
        }
        continue;
      }
      if (!response.ok) throw await errorFrom(response);
      switch (expect) {
        case 'json':
          return response.status === 204 ? null : response.json();
        case 'text':
          return response.text();
        case 'blob':
          return response.blob();
        case 'response':
          return response;
        default:
          return null;
      }
    }
  }

  /** Ask for a new sign-in once, however many requests are waiting for it. */
  signInAgain() {
    if (!this.reauth) {
      this.reauth = Promise.resolve()
        .then(() => this.onAuthRequired())
        .catch(() => false)
        .finally(() => {
          this.reauth = null;
        });
    }
    return this.reauth;
  }

  // -- accounts -----------------------------------------------------------------------------
  signUp(email, password) {
    return this.request('POST', '/v1/auth/signup', { json: { email, password }, auth: 'none' });
  }

  signIn(email, password) {
    return this.request('POST', '/v1/auth/token', { json: { email, password }, auth: 'none' });
  }

  me() {
    return this.request('GET', '/v1/me');
  }

  /** GET /v1/me/progress: `{weeks: [...], totals: {...}}` over the last `weeks` weeks (1..104). */
  progress({ weeks = 12 } = {}) {
    return this.request('GET', `/v1/me/progress?${new URLSearchParams({ weeks: String(weeks) })}`);
  }

  // -- topics ---------------------------------------------------------------------------------
  async topics() {
    return (await this.request('GET', '/v1/topics')).topics;
  }

  // -- sessions -------------------------------------------------------------------------------
  createSession(topicId) {
    return this.request('POST', '/v1/sessions', { json: { topic_id: topicId } });
  }

  clientSecret(sessionId) {
    return this.request('POST', `/v1/sessions/${encodeURIComponent(sessionId)}/client-secret`);
  }

  /** Send an SDP offer with a client secret; resolves `{answer, location}`. */
  async offer(sessionId, secret, sdp) {
    const response = await this.request('POST', `/v1/sessions/${encodeURIComponent(sessionId)}/webrtc`, {
      body: sdp,
      headers: { 'Content-Type': 'application/sdp' },
      auth: { bearer: secret },
      expect: 'response',
    });
    return { answer: await response.text(), location: response.headers.get('Location') };
  }

  endSession(sessionId, { keepalive = false } = {}) {
    return this.request('POST', `/v1/sessions/${encodeURIComponent(sessionId)}/end`, { keepalive });
  }

  listSessions({ limit = 20, cursor = null } = {}) {
    const query = new URLSearchParams({ limit: String(limit) });
    if (cursor) query.set('cursor', cursor);
    return this.request('GET', `/v1/sessions?${query}`);
  }

  getSession(sessionId) {
    return this.request('GET', `/v1/sessions/${encodeURIComponent(sessionId)}`);
  }

  async transcript(sessionId) {
    return (await this.request('GET', `/v1/sessions/${encodeURIComponent(sessionId)}/transcript`)).segments;
  }

  /** One recorded track as a Blob (the token goes in a header, so it cannot be a plain `src`). */
  audio(sessionId, track) {
    return this.request('GET', `/v1/sessions/${encodeURIComponent(sessionId)}/audio/${track}`, { expect: 'blob' });
  }

  /** The session's zip export: `{blob, filename}`. */
  async exportSession(sessionId) {
    const response = await this.request('GET', `/v1/sessions/${encodeURIComponent(sessionId)}/export`, {
      expect: 'response',
    });
    const filename = attachmentName(response.headers.get('Content-Disposition'), `parley-session-${sessionId}.zip`);
    return { blob: await response.blob(), filename };
  }

  deleteSession(sessionId) {
    return this.request('DELETE', `/v1/sessions/${encodeURIComponent(sessionId)}`, { expect: 'none' });
  }

  // -- publication ----------------------------------------------------------------------------
  /** Step one: nothing is published; resolves `{code, confirmation_token, expires_at}`. */
  requestPublication(sessionId) {
    return this.request('POST', `/v1/sessions/${encodeURIComponent(sessionId)}/publication`, { json: {} });
  }

  /** Step two: publishes; resolves `{slug, url}`. */
  confirmPublication(sessionId, confirmationToken) {
    return this.request('POST', `/v1/sessions/${encodeURIComponent(sessionId)}/publication`, {
      json: { confirmation_token: confirmationToken },
    });
  }

  unpublish(sessionId) {
    return this.request('DELETE', `/v1/sessions/${encodeURIComponent(sessionId)}/publication`, { expect: 'none' });
  }
}
