/**
 * The live transcript, assembled from the events channel.
 *
 * `transcript.delta` events stream partial text per upstream item; `transcript.final` carries the
 * stored Segment. A final replaces the partial it completes: the one with the same `item_id` when
 * the event names it, else the oldest partial of the same speaker (API.md's Segment has no item id).
 * A final already shown (same segment id) is ignored, so the stored transcript can be merged in
 * after a reconnect to fill whatever was said while the browser was away.
 *
 * Display order: final segments by their start in the session, then the partials still streaming,
 * the learner's before the coach's (the learner's words prompt the answer being spoken).
 */

let keys = 0;

export class Transcript {
  constructor() {
    /** @type {Array<{key: string, itemId: string|null, segmentId: string|null, speaker: string, text: string, final: boolean, startMs: number|null, endMs: number|null, interrupted: boolean}>} */
    this.entries = [];
    this.listeners = new Set();
  }

  onChange(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  changed() {
    for (const listener of this.listeners) listener(this);
  }

  clear() {
    this.entries = [];
    this.changed();
  }

  /** A `transcript.delta` event. */
  applyDelta({ speaker, item_id: itemId, delta }) {
    if (typeof delta !== 'string' || !itemId) return;
    let entry = this.entries.find((e) => !e.final && e.itemId === itemId);
    if (!entry) {
      entry = { key: `p${(keys += 1)}`, itemId, segmentId: null, speaker: speaker === 'coach' ? 'coach' : 'learner', text: '', final: false, startMs: null, endMs: null, interrupted: false };
      this.entries.push(entry);
    }
    entry.text += delta;
    entry.interrupted = false;
    this.changed();
  }

  /** A `transcript.final` event's segment (or a stored Segment); `itemId` when the event has one. */
  applyFinal(segment, itemId = segment?.item_id ?? null) {
    if (!segment || typeof segment.text !== 'string') return;
    if (segment.id != null && this.entries.some((e) => e.final && e.segmentId === String(segment.id))) return;
    const speaker = segment.speaker === 'coach' ? 'coach' : 'learner';
    let entry = itemId ? this.entries.find((e) => !e.final && e.itemId === itemId) : undefined;
    entry ??= this.entries.find((e) => !e.final && e.speaker === speaker);
    if (!entry) {
      entry = { key: `f${(keys += 1)}`, itemId, speaker };
      this.entries.push(entry);
    }
    Object.assign(entry, {
      segmentId: segment.id != null ? String(segment.id) : null,
      speaker,
      text: segment.text,
      final: true,
      startMs: Number.isFinite(segment.start_ms) ? segment.start_ms : null,
      endMs: Number.isFinite(segment.end_ms) ? segment.end_ms : null,
      interrupted: false,
    });
    this.changed();
  }

  /** The stored transcript (GET …/transcript), e.g. after a reconnect: adds what is missing. */
  mergeStored(segments) {
    for (const segment of segments) {
      if (segment.final !== false) this.applyFinal(segment, null);
    }
  }

  /** The connection dropped: partials still open may never complete; mark them as cut off. */
  markPartialsInterrupted() {
    let any = false;
    for (const entry of this.entries) {
      if (!entry.final && !entry.interrupted) {
        entry.interrupted = true;
        any = true;
      }
    }
    if (any) this.changed();
  }

  /** The entries in display order (a new array). */
  ordered() {
    const finals = this.entries.filter((e) => e.final);
    const partials = this.entries.filter((e) => !e.final);
    finals.sort((a, b) => (a.startMs ?? 0) - (b.startMs ?? 0));
    const learner = partials.filter((e) => e.speaker === 'learner');
    const coach = partials.filter((e) => e.speaker === 'coach');
    return [...finals, ...learner, ...coach];
  }

  /** Has `speaker` at least one final segment? */
  hasFinal(speaker) {
    return this.entries.some((e) => e.final && e.speaker === speaker);
  }
}
