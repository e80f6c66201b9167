/**
 * A small seeded PRNG (SplitMix32) so that rotations and sketches are the same bytes on every
 * platform: only 32-bit integer arithmetic decides the stream.
 *
 * @module
 */

/** Deterministic stream of uniform u32 values. */
export class SplitMix32 {
  #state: number;

  constructor(seed: number) {
    this.#state = seed >>> 0;
  }

  /** Next value in [0, 2^32). */
  nextU32(): number {
    this.#state = (this.#state + 0x9e3779b9) >>> 0;
    let z = this.#state;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  }

  /** Next value in (0, 1), never exactly 0 (safe for log). */
  nextUnit(): number {
    return (this.nextU32() + 0.5) / 4294967296;
  }

  /** Standard normal sample (Box-Muller). */
  nextGaussian(): number {
    const u = this.nextUnit();
    const v = this.nextUnit();
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
  }
}
