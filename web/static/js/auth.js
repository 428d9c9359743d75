/**
 * Where the access token lives: this tab's sessionStorage (gone when the tab closes), or memory
 * when storage is unavailable. Never in a URL, a cookie or local storage.
 *
 * Storage is read on every access, so the stored value is the single source of truth.
 */

export const STORAGE_KEY = 'parley.auth';

/** sessionStorage if this browser lets us use it, else null (private modes can throw). */
export function sessionStorageOrNull(scope = globalThis) {
  try {
    const storage = scope.sessionStorage;
    const probe = '__parley_probe__';
    storage.setItem(probe, '1');
    storage.removeItem(probe);
    return storage;
  } catch {
    return null;
  }
}

export class TokenStore {
  constructor({ storage = sessionStorageOrNull(), now = () => Date.now() } = {}) {
    this.storage = storage;
    this.now = now;
    this.memory = null;
    this.listeners = new Set();
  }

  /** The saved credentials `{token, email, userId, expiresAt}` or null. */
  read() {
    if (!this.storage) return this.memory;
    try {
      const raw = this.storage.getItem(STORAGE_KEY);
      if (!raw) return null;
      const value = JSON.parse(raw);
      return value && typeof value.token === 'string' ? value : null;
    } catch {
      return null;
    }
  }

  get token() {
    return this.read()?.token ?? null;
  }

  get email() {
    return this.read()?.email ?? null;
  }

  get userId() {
    return this.read()?.userId ?? null;
  }

  get signedIn() {
    return this.token !== null;
  }

  /** True when the token's lifetime (as the server announced it) is over, or within `skewMs` of it. */
  expired(skewMs = 0) {
    const value = this.read();
    if (!value) return true;
    return typeof value.expiresAt === 'number' && this.now() + skewMs >= value.expiresAt;
  }

  /** Save a sign-in answer (`{access_token, expires_in}`) for `email` (and `userId` when known). */
  save({ access_token: token, expires_in: expiresIn }, { email, userId = null } = {}) {
    const value = {
      token,
      email: email ?? null,
      userId,
      expiresAt: Number.isFinite(expiresIn) ? this.now() + expiresIn * 1000 : null,
    };
    if (this.storage) {
      try {
        this.storage.setItem(STORAGE_KEY, JSON.stringify(value));
      } catch {
        this.storage = null;
      }
    }
    if (!this.storage) this.memory = value;
    this.changed();
  }

  /** Remember who the token belongs to (from GET /v1/me) without touching the token. */
  setUser({ id, email }) {
    const value = this.read();
    if (!value) return;
    value.userId = id;
    value.email = email;
    if (this.storage) this.storage.setItem(STORAGE_KEY, JSON.stringify(value));
    else this.memory = value;
    this.changed();
  }

  clear() {
    this.memory = null;
    try {
      this.storage?.removeItem(STORAGE_KEY);
    } catch {
      /* nothing to remove */
    }
    this.changed();
  }

  onChange(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  changed() {
    for (const listener of this.listeners) listener(this.read());
  }
}
