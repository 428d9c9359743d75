/**
 * Everything that goes wrong, in plain words that say what to do next.
 *
 * Pure functions of an error (and the browser's name); no DOM.
 */

import { ApiError } from './api.js';

/** 'chrome', 'edge', 'firefox', 'safari' or 'other', from a user-agent string. */
export function browserName(userAgent = globalThis.navigator?.userAgent ?? '') {
  if (/Edg\//.test(userAgent)) return 'edge';
  if (/Firefox\//.test(userAgent)) return 'firefox';
  if (/(Chrome|Chromium)\//.test(userAgent)) return 'chrome';
  if (/Safari\//.test(userAgent)) return 'safari';
  return 'other';
}

const PERMISSION_FIX = {
  chrome: 'Click the icon left of the address bar, set Microphone to "Allow", then try again.',
  edge: 'Click the lock icon left of the address bar, set Microphone to "Allow", then try again.',
  firefox: 'Click the microphone icon in the address bar, remove the block, then try again.',
  safari: 'Open Safari > Settings for this website, set Microphone to "Allow", then try again.',
  other: "Allow microphone access for this site in your browser's site settings, then try again.",
};

/**
 * What a failed `getUserMedia` means: `{kind, title, message}` with kind one of
 * `denied`, `system_denied`, `no_device`, `busy`, `insecure`, `unsupported`, `unknown`.
 */
export function micErrorMessage(err, browser = browserName()) {
  const name = err && err.name;
  const text = String((err && err.message) || '');
  if (name === 'NotAllowedError' || name === 'PermissionDeniedError' || name === 'SecurityError') {
    if (/system/i.test(text)) {
      return {
        kind: 'system_denied',
        title: 'Your computer blocks the microphone',
        message:
          "Your operating system doesn't let this browser use the microphone. Allow it in the system's privacy settings (Microphone), restart the browser, then try again.",
      };
    }
    return {
      kind: 'denied',
      title: 'Microphone access is blocked',
      message: `Parley needs your microphone to hear you. ${PERMISSION_FIX[browser] ?? PERMISSION_FIX.other}`,
    };
  }
  if (name === 'NotFoundError' || name === 'DevicesNotFoundError' || name === 'OverconstrainedError') {
    return {
      kind: 'no_device',
      title: 'No microphone found',
      message:
        'Plug in a microphone or a headset (or turn one on in your system sound settings), then try again.',
    };
  }
  if (name === 'NotReadableError' || name === 'TrackStartError' || name === 'AbortError') {
    return {
      kind: 'busy',
      title: 'Your microphone is busy',
      message:
        'Another app or browser tab is using the microphone, or it stopped working. Close other apps that use it (video calls, recorders), then try again.',
    };
  }
  if (name === 'InsecureContext' || name === 'TypeError') {
    return {
      kind: 'insecure',
      title: "The microphone can't be used here",
      message: 'Browsers only allow the microphone on secure pages: open Parley over https (or on localhost).',
    };
  }
  if (name === 'Unsupported') {
    return {
      kind: 'unsupported',
      title: "This browser can't make calls",
      message: 'Use a current version of Chrome, Edge, Firefox or Safari.',
    };
  }
  return {
    kind: 'unknown',
    title: "The microphone didn't start",
    message: 'Check that a microphone is connected and allowed for this site, then try again.',
  };
}

function seconds(ms) {
  const s = Math.max(1, Math.round((ms ?? 5000) / 1000));
  return s === 1 ? '1 second' : `${s} seconds`;
}

/**
 * A failed API call in plain words. `action` names what the learner was doing, for context:
 * 'signin', 'signup', 'start', 'connect', 'end', 'load', 'audio', 'export', 'delete', 'publish'.
 */
export function apiErrorMessage(err, action = 'load') {
  if (!(err instanceof ApiError)) return 'Something went wrong. Please try again.';
  if (err.network) return "Can't reach Parley. Check your internet connection, then try again.";
  switch (err.code) {
    case 'invalid_credentials':
      return 'The email or password is wrong.';
    case 'email_taken':
      return 'An account with this email already exists. Sign in instead.';
    case 'signed_out':
      return 'You are signed out. Sign in to continue.';
    case 'capacity':
      return `Parley is busy right now. Try again in ${seconds(err.retryAfterMs)}.`;
    case 'rate_limited':
      return `Too many attempts. Wait ${seconds(err.retryAfterMs)} and try again.`;
    case 'session_ended':
      return 'This session has already ended.';
    case 'session_not_finalized':
      return 'This session is still being saved. Try again in a few seconds.';
    case 'confirmation_invalid':
      return 'The confirmation expired. Start publishing again.';
    case 'audio_not_found':
      return 'No audio was recorded for this part of the session.';
    case 'client_secret_expired':
    case 'client_secret_used':
    case 'client_secret_invalid':
      return 'The connection ticket expired. Try again.';
    case 'invalid_sdp':
      return "This browser's call setup wasn't accepted. Use a current Chrome, Edge, Firefox or Safari.";
    case 'delete_incomplete':
      return "Deleting didn't finish on Parley's side. Try again in a minute.";
    case 'storage_unavailable':
    case 'dependency_unavailable':
    case 'upstream_unavailable':
      return 'Parley is having trouble on its side. Try again in a minute.';
    default:
      break;
  }
  if (err.status === 401) return 'Your sign-in has expired. Sign in again to continue.';
  if (err.status === 404) return action === 'delete' ? 'This session is already gone.' : "This wasn't found. It may have been deleted.";
  if (err.status === 405 && action === 'delete') return "This server can't delete sessions yet.";
  if (err.status === 422 || err.status === 400) {
    if (action === 'signup' && err.field === 'password') return 'Choose a password of at least 10 characters.';
    if (action === 'signup' && err.field === 'email') return 'Enter a valid email address.';
    return err.detail || 'Some of the details are not valid.';
  }
  if (err.status === 413) return 'That was too large to send.';
  if (err.status === 503) return `Parley is temporarily unavailable. Try again in ${seconds(err.retryAfterMs)}.`;
  if (err.status >= 500) return 'Parley hit a problem on its side. Try again in a minute.';
  return err.detail || 'Something went wrong. Please try again.';
}

/** An `error` event from the events channel (API.md), for the learner. */
export function eventErrorMessage(event) {
  switch (event && event.code) {
    case 'upstream_retrying':
      return 'The coach lost its connection for a moment. Reconnecting; keep talking, you are still being recorded.';
    case 'upstream_failed':
    case 'upstream_unavailable':
      return "The coach can't be reached right now, so the session has stopped. Everything up to here is saved.";
    case 'upstream_auth_failed':
    case 'upstream_quota':
      return 'The coach service is unavailable on this server, so the session has stopped. Everything up to here is saved.';
    default:
      return (event && typeof event.message === 'string' && event.message) || 'Something went wrong with the coach.';
  }
}

const STATUS_LABELS = {
  created: 'Not started',
  connecting: 'Connecting',
  live: 'Live',
  reconnecting: 'Reconnecting',
  ending: 'Ending',
  ended: 'Ended',
  processing: 'Being processed',
  processed: 'Ready',
  processing_failed: 'Processing failed',
  interrupted: 'Interrupted',
  failed: "Didn't start",
};

/** A session status (API.md) as a short label. */
export function statusLabel(status) {
  return STATUS_LABELS[status] ?? status;
}
