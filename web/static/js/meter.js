/**
 * The microphone level meter: an AnalyserNode on the mic stream, read a dozen times a second.
 * The level is in percent of a -60…0 dBFS scale; "speaking" is a level above a threshold, held
 * for a moment so the indicator does not flicker between syllables.
 */

/** RMS of samples in [-1, 1]. */
export function rms(samples) {
  if (!samples || samples.length === 0) return 0;
  let sum = 0;
  for (let i = 0; i < samples.length; i += 1) sum += samples[i] * samples[i];
  return Math.sqrt(sum / samples.length);
}

/** An RMS value as 0-100 on a -60…0 dBFS scale. */
export function levelPercent(value, floorDb = -60) {
  if (!(value > 0)) return 0;
  const db = 20 * Math.log10(value);
  return Math.max(0, Math.min(100, Math.round(((db - floorDb) / -floorDb) * 100)));
}

export class MicMeter {
  /**
   * @param {object} options
   * @param {() => AudioContext|null} options.audioContext the page's context (created on a click)
   * @param {(level: number, speaking: boolean) => void} options.onLevel
   */
  constructor({ audioContext, onLevel, intervalMs = 80, speakingAt = 35, holdMs = 350, timers = globalThis, now = () => Date.now() }) {
    Object.assign(this, { audioContext, onLevel, intervalMs, speakingAt, holdMs, timers, now });
    this.source = null;
    this.analyser = null;
    this.timer = null;
    this.lastLoud = 0;
  }

  attach(stream) {
    this.detach();
    const context = this.audioContext();
    if (!context || !stream) return;
    if (context.state === 'suspended') context.resume().catch(() => {});
    this.source = context.createMediaStreamSource(stream);
    this.analyser = context.createAnalyser();
    this.analyser.fftSize = 1024;
    this.source.connect(this.analyser);
    const buffer = new Float32Array(this.analyser.fftSize);
    this.timer = this.timers.setInterval(() => {
      this.analyser.getFloatTimeDomainData(buffer);
      const level = levelPercent(rms(buffer));
      const t = this.now();
      if (level >= this.speakingAt) this.lastLoud = t;
      this.onLevel(level, t - this.lastLoud < this.holdMs);
    }, this.intervalMs);
  }

  detach() {
    if (this.timer !== null) this.timers.clearInterval(this.timer);
    this.timer = null;
    try {
      this.source?.disconnect();
    } catch {
      // already disconnected
    }
    this.source = null;
    this.analyser = null;
    this.onLevel(0, false);
  }
}
