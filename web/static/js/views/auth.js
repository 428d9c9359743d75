/** Sign in / create an account. */

import { h, replace } from '../dom.js';
import { apiErrorMessage } from '../messages.js';

export class AuthView {
  constructor(ctx, root) {
    this.ctx = ctx;
    this.root = root;
    this.mode = 'signin';
    this.build();
  }

  build() {
    this.heading = h('h1', { id: 'auth-title', tabindex: '-1', text: 'Sign in to Parley' });
    this.intro = h('p', { class: 'lead', text: 'Practise speaking with an AI coach. Pick a topic, talk, and get your session back to replay.' });
    this.signinTab = h('button', { type: 'button', class: 'tab', 'aria-pressed': 'true', text: 'I have an account', onclick: () => this.setMode('signin') });
    this.signupTab = h('button', { type: 'button', class: 'tab', 'aria-pressed': 'false', text: 'Create an account', onclick: () => this.setMode('signup') });
    this.email = h('input', { id: 'auth-email', type: 'email', name: 'email', autocomplete: 'username', required: true, inputmode: 'email' });
    this.password = h('input', { id: 'auth-password', type: 'password', name: 'password', autocomplete: 'current-password', required: true, 'aria-describedby': 'auth-password-hint' });
    this.hint = h('p', { id: 'auth-password-hint', class: 'muted', hidden: true, text: 'At least 10 characters.' });
    this.error = h('p', { class: 'error', role: 'alert', id: 'auth-error' });
    this.submit = h('button', { type: 'submit', class: 'primary', text: 'Sign in' });
    this.form = h(
      'form',
      { class: 'card auth-form', novalidate: true, 'aria-labelledby': 'auth-title', onsubmit: (e) => this.onSubmit(e) },
      h('div', { class: 'tabs', role: 'group', 'aria-label': 'Account' }, this.signinTab, this.signupTab),
      h('label', { for: 'auth-email', text: 'Email' }),
      this.email,
      h('label', { for: 'auth-password', text: 'Password' }),
      this.password,
      this.hint,
      this.error,
      this.submit,
    );
    replace(this.root, this.heading, this.intro, this.form);
  }

  setMode(mode) {
    this.mode = mode;
    const signup = mode === 'signup';
    this.signinTab.setAttribute('aria-pressed', String(!signup));
    this.signupTab.setAttribute('aria-pressed', String(signup));
    this.heading.textContent = signup ? 'Create your Parley account' : 'Sign in to Parley';
    this.submit.textContent = signup ? 'Create account' : 'Sign in';
    this.password.autocomplete = signup ? 'new-password' : 'current-password';
    this.password.minLength = signup ? 10 : 0;
    this.hint.hidden = !signup;
    this.error.textContent = '';
  }

  show() {
    this.error.textContent = '';
    this.password.value = '';
  }

  focusTarget() {
    return this.email.value ? this.password : this.email;
  }

  async onSubmit(event) {
    event.preventDefault();
    const email = this.email.value.trim();
    const password = this.password.value;
    if (!email || !password) {
      this.error.textContent = 'Enter your email and password.';
      (email ? this.password : this.email).focus();
      return;
    }
    if (this.mode === 'signup' && password.length < 10) {
      this.error.textContent = 'Choose a password of at least 10 characters.';
      this.password.focus();
      return;
    }
    this.submit.disabled = true;
    this.error.textContent = '';
    try {
      const { api, tokens } = this.ctx;
      const answer = this.mode === 'signup' ? await api.signUp(email, password) : await api.signIn(email, password);
      tokens.save(answer, { email: answer.user?.email ?? email, userId: answer.user?.id ?? null });
      if (!answer.user) {
        const me = await api.me();
        tokens.setUser(me);
      }
      this.password.value = '';
      this.ctx.afterSignIn();
    } catch (err) {
      this.error.textContent = apiErrorMessage(err, this.mode);
    } finally {
      this.submit.disabled = false;
    }
  }
}
