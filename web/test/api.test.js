import { describe, expect, it, vi } from 'vitest';

import { Api, ApiError, attachmentName, errorFrom, isClientSecretError } from '../static/js/api.js';
import { TokenStore } from '../static/js/auth.js';

function memoryStorage() {
  const data = new Map();
  return {
    getItem: (k) => (data.has(k) ? data.get(k) : null),
    setItem: (k, v) => data.set(k, String(v)),
    removeItem: (k) => data.delete(k),
  };
}

function response(status, body, headers = {}) {
  const isJson = body !== null && typeof body === 'object';
  const type = headers['Content-Type'] ?? (isJson ? (status >= 400 ? 'application/problem+json' : 'application/json') : 'text/plain');
  return new Response(isJson ? JSON.stringify(body) : body, { status, headers: { 'Content-Type': type, ...headers } });
}

function setup(handler, { onAuthRequired } = {}) {
  const tokens = new TokenStore({ storage: memoryStorage() });
  tokens.save({ access_token: 'tok-1', expires_in: 3600 }, { email: 'a@example.org', userId: 'u1' });
  const calls = [];
  const fetch = vi.fn(async (url, init) => {
    calls.push({ url, init });
    return handler(url, init, calls.length);
  });
  const api = new Api({ tokens, fetch, onAuthRequired });
  return { api, tokens, calls, fetch };
}

describe('errors', () => {
  it('reads problem+json into an ApiError with code, detail and Retry-After', async () => {
    const err = await errorFrom(
      response(503, { type: 't', title: 'Service Unavailable', status: 503, detail: 'This node is at capacity; try again shortly.', code: 'capacity' }, { 'Retry-After': '7' }),
    );
    expect(err).toBeInstanceOf(ApiError);
    expect(err).toMatchObject({ status: 503, code: 'capacity', retryAfterMs: 7000, title: 'Service Unavailable' });
    expect(err.network).toBe(false);
  });

  it('copes with a non-JSON error body', async () => {
    const err = await errorFrom(response(502, 'Bad gateway'));
    expect(err).toMatchObject({ status: 502, code: 'http_502', detail: '' });
  });

  it('tells client-secret 401s from access-token 401s', () => {
    expect(isClientSecretError(new ApiError({ status: 401, code: 'client_secret_used' }))).toBe(true);
    expect(isClientSecretError(new ApiError({ status: 401, code: 'unauthorized' }))).toBe(false);
  });

  it('a network failure is status 0', async () => {
    const { api } = setup(() => {
      throw new TypeError('Failed to fetch');
    });
    await expect(api.topics()).rejects.toMatchObject({ status: 0, code: 'network' });
  });

  it('reads the export file name', () => {
    expect(attachmentName('attachment; filename="parley-session-abc.zip"', 'x')).toBe('parley-session-abc.zip');
    expect(attachmentName(null, 'x.zip')).toBe('x.zip');
  });
});

describe('requests', () => {
  it('sends the access token as a Bearer header, never in the URL', async () => {
    const { api, calls } = setup(() => response(200, { topics: [] }));
    await api.topics();
    expect(calls[0].url).toBe('/v1/topics');
    expect(calls[0].init.headers.Authorization).toBe('Bearer tok-1');
    expect(calls[0].init.credentials).toBe('omit');
    expect(calls[0].url).not.toContain('tok-1');
  });

  it('offers SDP with the client secret and returns the answer and Location', async () => {
    const { api, calls } = setup(() => response(201, 'v=0\r\nanswer', { 'Content-Type': 'application/sdp', Location: '/v1/sessions/s1/webrtc/peer_x' }));
    const reply = await api.offer('s1', 'secret-abc', 'v=0\r\noffer');
    expect(reply).toEqual({ answer: 'v=0\r\nanswer', location: '/v1/sessions/s1/webrtc/peer_x' });
    expect(calls[0].init).toMatchObject({ method: 'POST', body: 'v=0\r\noffer' });
    expect(calls[0].init.headers).toEqual({ 'Content-Type': 'application/sdp', Authorization: 'Bearer secret-abc' });
  });

  it('publication is two requests: {} then the confirmation token', async () => {
    const { api, calls } = setup((url, init, n) =>
      n === 1
        ? response(202, { code: 'confirmation_required', confirmation_token: 'ct', expires_at: 'z' })
        : response(201, { slug: 'abc', url: '/p/abc' }),
    );
    expect((await api.requestPublication('s1')).confirmation_token).toBe('ct');
    expect(await api.confirmPublication('s1', 'ct')).toEqual({ slug: 'abc', url: '/p/abc' });
    expect(calls.map((c) => c.init.body)).toEqual(['{}', '{"confirmation_token":"ct"}']);
    expect(calls.every((c) => c.url === '/v1/sessions/s1/publication')).toBe(true);
  });

  it('a 204 answers null; ids are URL-encoded', async () => {
    const { api, calls } = setup(() => new Response(null, { status: 204 }));
    expect(await api.deleteSession('a/b')).toBeNull();
    expect(calls[0].url).toBe('/v1/sessions/a%2Fb');
  });
});

describe('an expired access token', () => {
  it('asks the learner to sign in again, then retries with the new token', async () => {
    let tokens;
    const onAuthRequired = vi.fn(async () => {
      tokens.save({ access_token: 'tok-2', expires_in: 3600 }, { email: 'a@example.org', userId: 'u1' });
      return true;
    });
    const env = setup((url, init) => (init.headers.Authorization === 'Bearer tok-1' ? response(401, { code: 'unauthorized', status: 401 }) : response(200, { id: 'u1' })), { onAuthRequired });
    tokens = env.tokens;
    expect(await env.api.me()).toEqual({ id: 'u1' });
    expect(onAuthRequired).toHaveBeenCalledTimes(1);
    expect(env.calls.map((c) => c.init.headers.Authorization)).toEqual(['Bearer tok-1', 'Bearer tok-2']);
  });

  it('several requests failing at once share one sign-in prompt', async () => {
    let tokens;
    let release;
    const onAuthRequired = vi.fn(
      () =>
        new Promise((resolve) => {
          release = () => {
            tokens.save({ access_token: 'tok-2', expires_in: 3600 }, {});
            resolve(true);
          };
        }),
    );
    const env = setup((url, init) => (init.headers.Authorization === 'Bearer tok-1' ? response(401, { code: 'unauthorized' }) : response(200, { ok: url })), { onAuthRequired });
    tokens = env.tokens;
    const a = env.api.request('GET', '/a');
    const b = env.api.request('GET', '/b');
    await vi.waitFor(() => expect(release).toBeTypeOf('function'));
    await new Promise((r) => setTimeout(r, 0));
    release();
    expect(await Promise.all([a, b])).toEqual([{ ok: '/a' }, { ok: '/b' }]);
    expect(onAuthRequired).toHaveBeenCalledTimes(1);
  });

  it('when the learner declines, the 401 is the answer', async () => {
    const env = setup(() => response(401, { code: 'unauthorized', detail: 'Missing or invalid credentials.' }), { onAuthRequired: async () => false });
    await expect(env.api.me()).rejects.toMatchObject({ status: 401, code: 'unauthorized' });
  });

  it('a client-secret 401 never opens the sign-in prompt', async () => {
    const onAuthRequired = vi.fn(async () => true);
    const env = setup(() => response(401, { code: 'client_secret_expired' }), { onAuthRequired });
    await expect(env.api.offer('s1', 'sec', 'v=0')).rejects.toMatchObject({ code: 'client_secret_expired' });
    expect(onAuthRequired).not.toHaveBeenCalled();
  });

  it('signed out: asks for a sign-in before sending anything', async () => {
    const env = setup(() => response(200, {}), { onAuthRequired: async () => false });
    env.tokens.clear();
    await expect(env.api.me()).rejects.toMatchObject({ code: 'signed_out' });
    expect(env.fetch).not.toHaveBeenCalled();
  });
});
