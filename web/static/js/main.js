/**
 * Parley's learner client: wires the API, the token store, the call controller and the views,
 * and routes between the views on the URL's hash.
 */

import { Api } from './api.js';
import { TokenStore } from './auth.js';
import { CallController } from './call.js';
import { byId } from './dom.js';
import { parseRoute } from './router.js';
import { AuthView } from './views/auth.js';
import { CallView } from './views/call.js';
import { confirmAction, signInAgain } from './views/dialogs.js';
import { HistoryView } from './views/history.js';
import { ProgressView } from './views/progress.js';
import { SessionView } from './views/session.js';
import { TopicsView } from './views/topics.js';

const tokens = new TokenStore();
const api = new Api({
  tokens,
  onAuthRequired: () => signInAgain({ api, tokens, onSignOut: () => signOut({ ask: false }) }),
});
const controller = new CallController({
  api,
  media: navigator.mediaDevices,
  createPeerConnection: (config) => new RTCPeerConnection(config),
  network: window,
});

let topicsPromise = null;
const topics = {
  all() {
    topicsPromise ??= api.topics().catch((err) => {
      topicsPromise = null;
      throw err;
    });
    return topicsPromise;
  },
  async byId() {
    return new Map((await this.all()).map((t) => [t.id, t]));
  },
};

let pendingRoute = null;
let flashText = '';
const flashEl = byId('flash');

const ctx = {
  api,
  tokens,
  controller,
  topics,
  go(hash) {
    if (location.hash === hash) render();
    else location.hash = hash;
  },
  startCall(topic) {
    if (controller.active) return;
    ctx.go('#/call');
    // In the click's own task: the audio context and autoplay need the learner's gesture.
    views.call.start(topic).catch(() => {});
  },
  afterSignIn() {
    const target = pendingRoute && pendingRoute !== '#/signin' ? pendingRoute : '#/topics';
    pendingRoute = null;
    renderAccount();
    ctx.go(target);
  },
  onCallState(state) {
    const running = controller.active;
    byId('live-banner').hidden = !running || currentName === 'call';
    document.body.classList.toggle('in-call', running);
    if (currentName === 'topics') views.topics.render();
    if (state === 'ended' || state === 'failed') byId('live-banner').hidden = true;
  },
  flash(text) {
    flashText = text;
  },
};

const views = {
  signin: new AuthView(ctx, byId('view-signin')),
  topics: new TopicsView(ctx, byId('view-topics')),
  call: new CallView(ctx, byId('view-call')),
  history: new HistoryView(ctx, byId('view-history')),
  progress: new ProgressView(ctx, byId('view-progress')),
  session: new SessionView(ctx, byId('view-session')),
};

let currentName = null;

function render() {
  const route = parseRoute(location.hash);
  if (route === null) return; // an in-page anchor such as #main, not a route
  if (!tokens.signedIn && route.name !== 'signin') {
    pendingRoute = location.hash || null;
    location.replace('#/signin');
    return;
  }
  if (route.name === 'home' || route.name === 'notfound' || (route.name === 'signin' && tokens.signedIn)) {
    location.replace('#/topics');
    return;
  }
  const name = route.name;
  if (currentName && currentName !== name) views[currentName].hide?.();
  for (const [key, view] of Object.entries(views)) view.root.hidden = key !== name;
  const changed = currentName !== name;
  currentName = name;
  for (const link of document.querySelectorAll('nav a')) {
    if (link.getAttribute('href') === `#/${name}`) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  byId('live-banner').hidden = !controller.active || name === 'call';
  flashEl.textContent = flashText;
  flashEl.hidden = !flashText;
  flashText = '';
  const titles = { signin: 'Sign in', topics: 'Pick a topic', call: 'Session', history: 'Your sessions', progress: 'Your progress', session: 'Session' };
  document.title = `${titles[name]} · Parley`;
  Promise.resolve(views[name].show(route)).catch(() => {});
  if (changed) views[name].focusTarget?.()?.focus({ preventScroll: false });
}

function renderAccount() {
  const signedIn = tokens.signedIn;
  byId('nav').hidden = !signedIn;
  byId('account').hidden = !signedIn;
  byId('account-email').textContent = tokens.email ?? '';
}

async function signOut({ ask = true } = {}) {
  if (controller.active && ask) {
    const ok = await confirmAction({
      title: 'End your session and sign out?',
      body: 'Your session is still running. Signing out ends it; everything so far is saved.',
      confirmLabel: 'End and sign out',
      danger: true,
    });
    if (!ok) return;
    await controller.end();
  } else if (controller.active) {
    controller.abandon('You signed out, so the session was ended. Everything up to then is saved.');
  }
  tokens.clear();
  // Start from a blank page: nothing of this learner (transcript, audio) stays in memory for the next.
  location.replace('#/signin');
  location.reload();
}

byId('sign-out').addEventListener('click', () => signOut());
byId('skip-link').addEventListener('click', (event) => {
  event.preventDefault();
  byId('main').focus();
});
tokens.onChange(renderAccount);
window.addEventListener('hashchange', render);
// Leaving the page ends a running session on the server instead of leaving it to time out.
window.addEventListener('pagehide', () => controller.abandon());
window.addEventListener('beforeunload', (event) => {
  if (!controller.active) return;
  event.preventDefault(); // the browser asks "Leave site?": leaving ends the session
  event.returnValue = '';
});

renderAccount();
byId('app-loading')?.remove();
render();

