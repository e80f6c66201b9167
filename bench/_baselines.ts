/**
 * Comparison quantizers that the demo and benchmarks plot against TurboQuant at equal bits per
 * value: llama.cpp's q4_0 and q8_0 (blocks of 32 values, one f16 scale per block), and the same
 * after a randomized Hadamard rotation of each 32-block (llama.cpp's "rotated q4_0").
 *
 * Every quantizer is a quantize-dequantize round trip with the signature
 * `(x: Float32Array, headDim: number) => Float32Array`: `x` holds `count * headDim` values (one
 * row per vector), `headDim` must be a multiple of 32, and blocks never straddle rows.
 *
 * - q4_0 (llama.cpp `quantize_row_q4_0_ref`): the block's value of largest magnitude, with its
 *   sign, is `max`; `d = max / -8`; codes `min(15, trunc(x / d + 8.5))` (0..15); decode
 *   `(code - 8) * f16(d)`. 32 * 4 bits + 16 bits of scale = 4.5 bits per value.
 * - q8_0 (`quantize_row_q8_0_ref`): `d = absmax / 127`; codes `roundf(x / d)` (-127..127);
 *   decode `code * f16(d)`. 8.5 bits per value.
 * - Rotated variants: each 32-block is multiplied by random +-1 signs and then by the
 *   normalised 32-point Walsh-Hadamard matrix H / sqrt(32) before quantization, and rotated
 *   back after decoding. The signs depend on the value's position in the row (one sign per
 *   channel, drawn from a seeded generator) and are the same for every row, so the rotation is
 *   one fixed orthogonal matrix per head, as a cache needs (queries can be rotated once). No
 *   extra storage: the same bits per value as the unrotated format.
 *
 * @module
 */

/** Values per block in q4_0 and q8_0. */
export const BLOCK = 32;

/** Stored bits per value of q4_0: 4-bit codes plus one f16 scale per 32 values. */
export const Q4_0_BITS_PER_VALUE = (BLOCK * 4 + 16) / BLOCK; // 4.5
/** Stored bits per value of q8_0: 8-bit codes plus one f16 scale per 32 values. */
export const Q8_0_BITS_PER_VALUE = (BLOCK * 8 + 16) / BLOCK; // 8.5

/** Seed of the rotation signs unless one is given. */
export const DEFAULT_ROTATION_SEED = 0x5eed;

/** A quantize-dequantize round trip over rows of `headDim` values. */
export type QuantizeDequantize = (x: Float32Array, headDim: number) => Float32Array;

/** A named baseline with its storage cost. */
export interface Baseline {
  /** Short name for tables and plots: "q4_0", "q8_0", "rot-q4_0", "rot-q8_0". */
  name: string;
  /** Stored bits per value, scales included. */
  bitsPerValue: number;
  /** The quantize-dequantize round trip. */
  quantizeDequantize: QuantizeDequantize;
}

function checkShape(x: Float32Array, headDim: number): void {
  if (!Number.isInteger(headDim) || headDim <= 0 || headDim % BLOCK !== 0) {
    throw new RangeError(`headDim must be a positive multiple of ${BLOCK}, got ${headDim}`);
  }
  if (x.length % headDim !== 0) {
    throw new RangeError(`length ${x.length} is not a multiple of headDim ${headDim}`);
  }
}

const f32 = Math.fround;
const f16 = Math.f16round;

/** C's roundf: half away from zero. */
function roundf(v: number): number {
  return v < 0 ? -Math.floor(-v + 0.5) : Math.floor(v + 0.5);
}

function q4_0Block(x: Float32Array, o: number, out: Float32Array): void {
  let amax = 0;
  let max = 0;
  for (let j = 0; j < BLOCK; j++) {
    const v = x[o + j];
    if (amax < Math.abs(v)) {
      amax = Math.abs(v);
      max = v;
    }
  }
  const d = f32(max / -8);
  const id = d !== 0 ? f32(1 / d) : 0;
  const dh = f16(d);
  for (let j = 0; j < BLOCK; j++) {
    const q = Math.min(15, Math.trunc(f32(f32(x[o + j] * id) + 8.5)));
    out[o + j] = (q - 8) * dh;
  }
}

function q8_0Block(x: Float32Array, o: number, out: Float32Array): void {
  let amax = 0;
  for (let j = 0; j < BLOCK; j++) amax = Math.max(amax, Math.abs(x[o + j]));
  const d = f32(amax / 127);
  const id = d !== 0 ? f32(1 / d) : 0;
  const dh = f16(d);
  for (let j = 0; j < BLOCK; j++) out[o + j] = roundf(f32(x[o + j] * id)) * dh;
}

function blockwise(
  block: (x: Float32Array, o: number, out: Float32Array) => void,
): QuantizeDequantize {
  return (x, headDim) => {
    checkShape(x, headDim);
    const out = new Float32Array(x.length);
    for (let o = 0; o < x.length; o += BLOCK) block(x, o, out);
    return out;
  };
}

/** llama.cpp q4_0 quantize-dequantize (4.5 bits per value). */
export const q4_0: QuantizeDequantize = blockwise(q4_0Block);

/** llama.cpp q8_0 quantize-dequantize (8.5 bits per value). */
export const q8_0: QuantizeDequantize = blockwise(q8_0Block);

/** Seeded +-1 signs, one per channel of a row of `headDim` values (splitmix32-style hash). */
export function rotationSigns(headDim: number, seed: number = DEFAULT_ROTATION_SEED): Float32Array {
  const s = new Float32Array(headDim);
  let state = seed >>> 0;
  for (let i = 0; i < headDim; i++) {
    state = (state + 0x9e3779b9) >>> 0;
    let z = state;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    z = (z ^ (z >>> 16)) >>> 0;
    s[i] = (z & 1) === 0 ? 1 : -1;
  }
  return s;
}

/** In-place normalised Walsh-Hadamard transform of one block of `BLOCK` values. */
function fwht(buf: Float64Array): void {
  for (let h = 1; h < BLOCK; h *= 2) {
    for (let i = 0; i < BLOCK; i += 2 * h) {
      for (let j = i; j < i + h; j++) {
        const a = buf[j];
        const b = buf[j + h];
        buf[j] = a + b;
        buf[j + h] = a - b;
      }
    }
  }
  const s = 1 / Math.sqrt(BLOCK);
  for (let i = 0; i < BLOCK; i++) buf[i] *= s;
}

/**
 * Rotates every 32-block: y = H D x with D the seeded signs of {@linkcode rotationSigns} and H
 * the normalised Walsh-Hadamard matrix. Orthogonal; {@linkcode unrotateBlocks} inverts it.
 */
export function rotateBlocks(
  x: Float32Array,
  headDim: number,
  seed: number = DEFAULT_ROTATION_SEED,
): Float32Array {
  checkShape(x, headDim);
  const signs = rotationSigns(headDim, seed);
  const out = new Float32Array(x.length);
  const buf = new Float64Array(BLOCK);
  for (let o = 0; o < x.length; o += BLOCK) {
    const c = o % headDim;
    for (let j = 0; j < BLOCK; j++) buf[j] = x[o + j] * signs[c + j];
    fwht(buf);
    out.set(buf, o);
  }
  return out;
}

/** Inverse of {@linkcode rotateBlocks}: x = D H y (H is symmetric and its own inverse). */
export function unrotateBlocks(
  y: Float32Array,
  headDim: number,
  seed: number = DEFAULT_ROTATION_SEED,
): Float32Array {
  checkShape(y, headDim);
  const signs = rotationSigns(headDim, seed);
  const out = new Float32Array(y.length);
  const buf = new Float64Array(BLOCK);
  for (let o = 0; o < y.length; o += BLOCK) {
    const c = o % headDim;
    for (let j = 0; j < BLOCK; j++) buf[j] = y[o + j];
    fwht(buf);
    for (let j = 0; j < BLOCK; j++) out[o + j] = buf[j] * signs[c + j];
  }
  return out;
}

/** Wraps a quantizer in the block rotation: unrotate(quantize(rotate(x))). */
export function rotated(
  quantize: QuantizeDequantize,
  seed: number = DEFAULT_ROTATION_SEED,
): QuantizeDequantize {
  return (x: Float32Array, headDim: number): Float32Array =>
    unrotateBlocks(quantize(rotateBlocks(x, headDim, seed), headDim), headDim, seed);
}

/** q4_0 after a randomized Hadamard rotation of each 32-block (4.5 bits per value). */
export const rotatedQ4_0: QuantizeDequantize = rotated(q4_0);

/** q8_0 after a randomized Hadamard rotation of each 32-block (8.5 bits per value). */
export const rotatedQ8_0: QuantizeDequantize = rotated(q8_0);

/** All four baselines, for tables and plots. */
export const BASELINES: readonly Baseline[] = [
  { name: "q4_0", bitsPerValue: Q4_0_BITS_PER_VALUE, quantizeDequantize: q4_0 },
  { name: "rot-q4_0", bitsPerValue: Q4_0_BITS_PER_VALUE, quantizeDequantize: rotatedQ4_0 },
  { name: "q8_0", bitsPerValue: Q8_0_BITS_PER_VALUE, quantizeDequantize: q8_0 },
  { name: "rot-q8_0", bitsPerValue: Q8_0_BITS_PER_VALUE, quantizeDequantize: rotatedQ8_0 },
];

/** Normalised MSE: sum of squared errors over sum of squares of `x`. */
export function normalisedMse(x: Float32Array, y: Float32Array): number {
  if (x.length !== y.length) throw new RangeError(`lengths differ: ${x.length} vs ${y.length}`);
  let e = 0, n = 0;
  for (let i = 0; i < x.length; i++) {
    e += (x[i] - y[i]) ** 2;
    n += x[i] ** 2;
  }
  return n === 0 ? 0 : e / n;
}
