/**
 * The K/V storage formats the demo compares, each as a quantize-dequantize round trip over rows
 * of `headDim` values: TurboQuant (the library's CPU codec), per-block absmax quantizers in the
 * style of llama.cpp's q4_0 / q5_0 / q8_0 at any bit width, the same after a randomized Hadamard
 * rotation, and f16 / f32.
 *
 * @module
 */

import { TurboQuantCodec } from "../../mod.ts";
import {
  BLOCK,
  q4_0,
  q8_0,
  type QuantizeDequantize,
  rotated,
  rotatedQ4_0,
  rotatedQ8_0,
} from "../../bench/_baselines.ts";

/** Which line of the plot a method belongs to. */
export type Family = "float" | "turboquant" | "absmax" | "rotated-absmax";

/** A K/V storage format. */
export interface KVMethod {
  /** Name for tables and legends. */
  name: string;
  /** Plot line it belongs to. */
  family: Family;
  /** Code bits per value (16 / 32 for the float formats). */
  bits: number;
  /** Stored bits per value, scales included. */
  bitsPerValue: number;
  /** Quantize-dequantize of rows of `headDim` values (used for both K and V). */
  roundTrip: QuantizeDequantize;
  /** The TurboQuant codec settings, for a GPU cache to use instead (turboquant family only). */
  codec?: { bits: number; blockSize: number };
}

const f32 = Math.fround;
const f16 = Math.f16round;

/**
 * Per-block absmax quantizer with `bits`-bit codes in the style of llama.cpp's q4_0 and q5_0:
 * blocks of 32 values, `d = max / -2^(bits-1)` where `max` is the signed value of largest
 * magnitude, codes `min(2^bits - 1, trunc(x / d + 2^(bits-1) + 0.5))`, decode
 * `(code - 2^(bits-1)) * f16(d)`. One f16 scale per block: bits + 0.5 bits per value. With
 * bits = 4 this is q4_0 exactly, with 5 llama.cpp's q5_0.
 */
export function absmaxRoundTrip(bits: number): QuantizeDequantize {
  if (!Number.isInteger(bits) || bits < 2 || bits > 8) {
    throw new RangeError(`bits must be an integer from 2 to 8, got ${bits}`);
  }
  const half = 2 ** (bits - 1);
  const top = 2 ** bits - 1;
  return (x, headDim) => {
    if (headDim % BLOCK !== 0 || x.length % headDim !== 0) {
      throw new RangeError(`need rows of a multiple of ${BLOCK} values, got headDim ${headDim}`);
    }
    const out = new Float32Array(x.length);
    for (let o = 0; o < x.length; o += BLOCK) {
      let amax = 0, max = 0;
      for (let j = 0; j < BLOCK; j++) {
        if (amax < Math.abs(x[o + j])) {
          amax = Math.abs(x[o + j]);
          max = x[o + j];
        }
      }
      const d = f32(max / -half);
      const id = d !== 0 ? f32(1 / d) : 0;
      const dh = f16(d);
      for (let j = 0; j < BLOCK; j++) {
        const q = Math.min(top, Math.trunc(f32(f32(x[o + j] * id) + half + 0.5)));
        out[o + j] = (q - half) * dh;
      }
    }
    return out;
  };
}

/** Stored bits per value of a per-block format with one f16 scale per `block` values. */
export function blockBitsPerValue(bits: number, block: number = BLOCK): number {
  return bits + 16 / block;
}

/**
 * The absmax method at `bits`: llama.cpp's own q4_0 and q8_0 at 4 and 8 bits (q8_0 is
 * symmetric, `d = absmax / 127`), the q4_0-style generalisation otherwise.
 */
export function absmaxMethod(bits: number): KVMethod {
  const roundTrip = bits === 4 ? q4_0 : bits === 8 ? q8_0 : absmaxRoundTrip(bits);
  return {
    name: `q${bits}_0`,
    family: "absmax",
    bits,
    bitsPerValue: blockBitsPerValue(bits),
    roundTrip,
  };
}

/** The absmax method after the randomized 32-point Hadamard rotation of bench/_baselines.ts. */
export function rotatedAbsmaxMethod(bits: number): KVMethod {
  const roundTrip = bits === 4
    ? rotatedQ4_0
    : bits === 8
    ? rotatedQ8_0
    : rotated(absmaxRoundTrip(bits));
  return {
    name: `rot-q${bits}_0`,
    family: "rotated-absmax",
    bits,
    bitsPerValue: blockBitsPerValue(bits),
    roundTrip,
  };
}

/** TurboQuant at `bits` with blocks of 32 (the library defaults otherwise: scale search on). */
export function turboQuantMethod(bits: number, blockSize = 32): KVMethod {
  const codecs = new Map<number, TurboQuantCodec>();
  const codecFor = (headDim: number): TurboQuantCodec => {
    let c = codecs.get(headDim);
    if (!c) codecs.set(headDim, c = new TurboQuantCodec({ headDim, bits, blockSize }));
    return c;
  };
  return {
    name: `TurboQuant ${bits}-bit`,
    family: "turboquant",
    bits,
    bitsPerValue: codecFor(blockSize).bitsPerValue,
    roundTrip: (x, headDim) => {
      const c = codecFor(headDim);
      return c.decode(c.encode(x));
    },
    codec: { bits, blockSize },
  };
}

/** IEEE half precision (round to nearest even). */
export const F16_METHOD: KVMethod = {
  name: "f16",
  family: "float",
  bits: 16,
  bitsPerValue: 16,
  roundTrip: (x) => x.map(f16),
};

/** The model's own f32 values (identity). */
export const F32_METHOD: KVMethod = {
  name: "f32",
  family: "float",
  bits: 32,
  bitsPerValue: 32,
  roundTrip: (x) => x.slice(),
};
