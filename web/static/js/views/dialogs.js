/**
 * Modal dialogs (<dialog>): sign in again, confirm a destructive action, publish in two steps.
 * Each opens with focus inside, closes on Escape (as "cancel") and gives focus back.
 */

import { ApiError } from '../api.js';
import { h, replace } from '../dom.js';
import { apiErrorMessage } from '../messages.js';

function dialogShell(id, labelId) {
  const dialog = h('dialog', { id, class: 'dialog', 'aria-labelledby': labelId });
  document.body.append(dialog);
  return dialog;
}

function openModal(dialog) {
  const returnTo = document.activeElement;
  dialog.showModal();
  dialog.addEventListener(
    'close',
    () => {
      if (returnTo && typeof returnTo.focus === 'function' && document.contains(returnTo)) returnTo.focus();
    },
    { once: true },
  );
}

/**
 * "Sign in again": the access token expired mid-way. Resolves true once a token for the same
 * learner is saved, false if the learner gives up (Escape or "Sign out").
 */
export function signInAgain({ api, tokens, onSignOut }) {
  const dialog = document.getElementById('dialog-signin') ?? dialogShell('dialog-signin', 'signin-again-title');
  const previousUser = tokens.userId;
  const email = h('input', { id: 'reauth-email', type: 'email', name: 'email', autocomplete: 'username', required: true });
  email.value = tokens.email ?? '';
  const password = h('input', { id: 'reauth-password', type: 'password', name: 'password', autocomplete: 'current-password', required: true });
  const error = h('p', { class: 'error', role: 'alert' });
  const submit = h('button', { type: 'submit', class: 'primary', text: 'Sign in' });
  const signOut = h('button', { type: 'button', class: 'secondary', text: 'Sign out instead' });
  const form = h(
    'form',
    { method: 'dialog', novalidate: true },
    h('h2', { id: 'signin-again-title', text: 'Please sign in again' }),
    h('p', { text: 'Your sign-in has expired. Sign in again to carry on; this page stays as it is.' }),
    h('label', { for: 'reauth-email', text: 'Email' }),
    email,
    h('label', { for: 'reauth-password', text: 'Password' }),
    password,
    error,
    h('div', { class: 'actions' }, submit, signOut),
  );
  replace(dialog, form);

  return new Promise((resolve) => {
    let settled = false;
    const finish = (ok) => {
      if (settled) return;
      settled = true;
      if (dialog.open) dialog.close();
      resolve(ok);
    };
    dialog.addEventListener('cancel', () => finish(false), { once: true });
    signOut.addEventListener('click', () => {
      finish(false);
      onSignOut?.();
    });
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      if (!email.value || !password.value) {
        error.textContent = 'Enter your email and password.';
        return;
      }
      submit.disabled = true;
      error.textContent = '';
      try {
        const answer = await api.signIn(email.value, password.value);
        const me = await api.request('GET', '/v1/me', { auth: { bearer: answer.access_token } });
        if (previousUser && me.id !== previousUser) {
          error.textContent = 'That is a different account. Sign in with the account this page belongs to, or sign out.';
          return;
        }
        tokens.save(answer, { email: me.email, userId: me.id });
        finish(true);
      } catch (err) {
        error.textContent = apiErrorMessage(err, 'signin');
      } finally {
        submit.disabled = false;
      }
    });
    openModal(dialog);
    (email.value ? password : email).focus();
  });
}

/** Ask before something that cannot be undone. Resolves true if confirmed. */
export function confirmAction({ title, body, confirmLabel, danger = false }) {
  const dialog = document.getElementById('dialog-confirm') ?? dialogShell('dialog-confirm', 'confirm-title');
  const ok = h('button', { type: 'button', class: danger ? 'danger' : 'primary', text: confirmLabel });
  const cancel = h('button', { type: 'button', class: 'secondary', text: 'Cancel' });
  replace(
    dialog,
    h('h2', { id: 'confirm-title', text: title }),
    h('p', { text: body }),
    h('div', { class: 'actions' }, ok, cancel),
  );
  return new Promise((resolve) => {
    let settled = false;
    const finish = (value) => {
      if (settled) return;
      settled = true;
      if (dialog.open) dialog.close();
      resolve(value);
    };
    dialog.addEventListener('cancel', () => finish(false), { once: true });
    ok.addEventListener('click', () => finish(true));
    cancel.addEventListener('click', () => finish(false));
    openModal(dialog);
    cancel.focus();
  });
}

/**
 * Publishing on purpose (API.md): step 1 explains and asks the server for a confirmation token
 * (nothing is public yet); step 2 publishes with it; step 3 shows the public link.
 * Resolves `{slug, url}` once published, null if the learner stops.
 */
export function publishFlow({ api, sessionId, origin = location.origin }) {
  const dialog = document.getElementById('dialog-publish') ?? dialogShell('dialog-publish', 'publish-title');
  return new Promise((resolve) => {
    let result = null;
    const close = () => {
      if (dialog.open) dialog.close();
    };
    dialog.addEventListener('close', () => resolve(result), { once: true });

    const error = h('p', { class: 'error', role: 'alert' });
    const stepOne = () => {
      const next = h('button', { type: 'button', class: 'primary', text: 'Continue' });
      const cancel = h('button', { type: 'button', class: 'secondary', text: 'Cancel', onclick: close });
      replace(
        dialog,
        h('h2', { id: 'publish-title', text: 'Publish this session?' }),
        h('p', { text: 'Anyone with the link will be able to hear both voices (yours and the coach’s) and read the transcript. Your email and account stay hidden.' }),
        h('p', { text: 'You can make it private again at any time; the old link then stops working.' }),
        error,
        h('div', { class: 'actions' }, next, cancel),
      );
      next.addEventListener('click', async () => {
        next.disabled = true;
        error.textContent = '';
        try {
          const answer = await api.requestPublication(sessionId);
          stepTwo(answer);
        } catch (err) {
          error.textContent = apiErrorMessage(err, 'publish');
          next.disabled = false;
        }
      });
      next.focus();
    };

    const stepTwo = (answer) => {
      const publish = h('button', { type: 'button', class: 'danger', text: 'Yes, publish it' });
      const cancel = h('button', { type: 'button', class: 'secondary', text: 'Keep it private', onclick: close });
      const until = answer.expires_at ? new Date(answer.expires_at).toLocaleTimeString() : null;
      replace(
        dialog,
        h('h2', { id: 'publish-title', text: 'Confirm: make it public' }),
        h('p', { text: 'Nothing is public yet. Press “Yes, publish it” to make this session public now.' }),
        until ? h('p', { class: 'muted', text: `This confirmation is valid until ${until}.` }) : null,
        error,
        h('div', { class: 'actions' }, publish, cancel),
      );
      publish.addEventListener('click', async () => {
        publish.disabled = true;
        error.textContent = '';
        try {
          result = await api.confirmPublication(sessionId, answer.confirmation_token);
          stepThree(result);
        } catch (err) {
          if (err instanceof ApiError && err.code === 'confirmation_invalid') {
            stepOne();
            error.textContent = apiErrorMessage(err, 'publish');
            return;
          }
          error.textContent = apiErrorMessage(err, 'publish');
          publish.disabled = false;
        }
      });
      cancel.focus();
    };

    const stepThree = (published) => {
      const url = new URL(published.url, origin).href;
      const field = h('input', { id: 'public-link', type: 'text', readonly: true, value: url });
      const copied = h('span', { class: 'muted', role: 'status' });
      const copy = h('button', { type: 'button', class: 'secondary', text: 'Copy link' });
      copy.addEventListener('click', async () => {
        try {
          await navigator.clipboard.writeText(url);
          copied.textContent = 'Copied.';
        } catch {
          field.select();
          copied.textContent = 'Press Ctrl+C (⌘C) to copy.';
        }
      });
      const done = h('button', { type: 'button', class: 'primary', text: 'Done', onclick: close });
      replace(
        dialog,
        h('h2', { id: 'publish-title', text: 'Your session is public' }),
        h('label', { for: 'public-link', text: 'Public link' }),
        field,
        h('div', { class: 'actions' }, copy, h('a', { href: url, target: '_blank', rel: 'noopener noreferrer', text: 'Open the public page' }), done),
        copied,
      );
      done.focus();
    };

    stepOne();
    openModal(dialog);
    dialog.querySelector('button')?.focus();
  });
}
