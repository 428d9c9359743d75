/**
 * Playback of a session's two recorded tracks as one: both start at the session's start (the
 * server fills gaps with silence), so one position drives both, and the transcript segment under
 * that position is the one being heard.
 */

/** Index of the segment being heard at `ms`: the last one that started at or before it; -1 before the first. */
export function activeSegment(segments, ms) {
  let found = -1;
  for (let i = 0; i < segments.length; i += 1) {
    if (segments[i].start_ms <= ms) found = i;
    else break;
  }
  if (found >= 0) {
    const seg = segments[found];
    // Past its end and well before the next: nobody is speaking.
    const next = segments[found + 1];
    if (ms > seg.end_ms + 1500 && (!next || next.start_ms > ms)) return -1;
  }
  return found;
}

/** Keeps several <audio> elements on one timeline. */
export class SyncPlayer {
  /**
   * @param {HTMLMediaElement[]} elements
   * @param {object} hooks `onTime(seconds)`, `onPlaying(boolean)`
   * @param {number} knownDurationS a fallback duration (the session's), for streams that do not say
   */
  constructor(elements, { onTime = () => {}, onPlaying = () => {} } = {}, knownDurationS = 0) {
    this.elements = elements;
    this.onTime = onTime;
    this.onPlaying = onPlaying;
    this.knownDurationS = knownDurationS;
    this.playing = false;
    for (const el of elements) {
      el.addEventListener('timeupdate', () => this.tick(el));
      el.addEventListener('ended', () => this.endedOne());
      el.addEventListener('durationchange', () => this.onTime(this.currentTime));
    }
  }

  get duration() {
    const known = this.elements.map((el) => el.duration).filter((d) => Number.isFinite(d) && d > 0);
    return Math.max(this.knownDurationS, ...known, 0);
  }

  get currentTime() {
    const times = this.elements.filter((el) => !el.ended).map((el) => el.currentTime);
    return times.length ? Math.max(...times) : this.duration;
  }

  async play() {
    if (this.currentTime >= this.duration - 0.05) this.seek(0);
    this.playing = true;
    this.onPlaying(true);
    const t = this.currentTime;
    const starts = [];
    for (const el of this.elements) {
      if (Number.isFinite(el.duration) && t >= el.duration) continue; // this track is over already
      starts.push(el.play());
    }
    try {
      await Promise.all(starts);
    } catch (err) {
      this.pause();
      throw err;
    }
  }

  pause() {
    this.playing = false;
    for (const el of this.elements) el.pause();
    this.onPlaying(false);
  }

  toggle() {
    return this.playing ? (this.pause(), Promise.resolve()) : this.play();
  }

  /** Jump every track to `seconds` (a track shorter than that is simply over). */
  seek(seconds) {
    const t = Math.max(0, Math.min(seconds, this.duration || seconds));
    for (const el of this.elements) {
      const end = Number.isFinite(el.duration) ? el.duration : t;
      el.currentTime = Math.min(t, end);
      if (this.playing && t < end && el.paused) el.play().catch(() => {});
    }
    this.onTime(t);
  }

  tick(source) {
    const t = source.currentTime;
    if (this.playing) {
      // Keep the others within a quarter second of the one that reported.
      for (const el of this.elements) {
        if (el === source || el.ended || el.paused) continue;
        if (Math.abs(el.currentTime - t) > 0.25 && (!Number.isFinite(el.duration) || t < el.duration)) el.currentTime = t;
      }
    }
    this.onTime(this.currentTime);
  }

  endedOne() {
    if (this.elements.every((el) => el.ended || el.paused)) {
      this.playing = false;
      this.onPlaying(false);
      this.onTime(this.currentTime);
    }
  }

  destroy() {
    this.pause();
    for (const el of this.elements) {
      el.removeAttribute('src');
      el.load();
    }
  }
}
