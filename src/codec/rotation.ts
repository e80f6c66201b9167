/**
 * The randomized Walsh-Hadamard rotation: flip signs with a seeded +-1 pattern, then a fast
 * Walsh-Hadamard transform over each block, scaled by 1/sqrt(blockSize).
 *
 * All arithmetic is f32 (every intermediate is stored in a Float32Array), in the same order
 * as the WGSL kernels, so that CPU and GPU produce the same bits.
 *
 * @module
 */

import { SplitMix32 } from "./_prng.ts";

/** The seeded +-1 pattern for `n` coordinates. */
export function rotationSigns(seed: number, n: number): Float32Array {
  const rng = new SplitMix32(seed ^ 0x51a7e5);
  const signs = new Float32Array(n);
  for (let i = 0; i < n; i += 32) {
    const word = rng.nextU32();
    for (let j = 0; j < 32 && i + j < n; j++) signs[i + j] = (word >>> j) & 1 ? -1 : 1;
  }
  return signs;
}

/**
 * In-place normalised Walsh-Hadamard transform of `x[offset .. offset + size)`.
 * Butterfly stages run with h = 1, 2, 4, ...; the scale 1/sqrt(size) (rounded to f32) is
 * applied once at the end. The transform is its own inverse up to rounding.
 */
export function fwht(x: Float32Array, offset: number, size: number): void {
  for (let h = 1; h < size; h *= 2) {
    for (let i = 0; i < size; i += 2 * h) {
      for (let j = offset + i; j < offset + i + h; j++) {
        const a = x[j];
        const b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
  const s = Math.fround(1 / Math.sqrt(size));
  for (let j = offset; j < offset + size; j++) x[j] *= s;
}

/** Rotates one vector in place: signs first, then a Hadamard transform per block. */
export function rotate(x: Float32Array, signs: Float32Array, blockSize: number): void {
  for (let i = 0; i < x.length; i++) x[i] *= signs[i];
  for (let b = 0; b < x.length; b += blockSize) fwht(x, b, blockSize);
}

/** Inverse of {@linkcode rotate}: a Hadamard transform per block, then the signs. */
export function unrotate(x: Float32Array, signs: Float32Array, blockSize: number): void {
  for (let b = 0; b < x.length; b += blockSize) fwht(x, b, blockSize);
  for (let i = 0; i < x.length; i++) x[i] *= signs[i];
}
