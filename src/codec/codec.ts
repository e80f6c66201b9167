/**
 * The TurboQuant codec on the CPU: the reference every GPU kernel is checked against, and the
 * fallback where there is no GPU.
 *
 * Per vector of `headDim` values: flip signs with a seeded pattern, rotate each block of
 * `blockSize` values by a normalised Walsh-Hadamard transform, pick one f16 scale per block
 * and the nearest Lloyd-Max centroid per coordinate. All arithmetic is f32, in the order the
 * WGSL kernels use, so GPU codes equal CPU codes.
 *
 * @module
 */

import { check, describe, TurboQuantError } from "../errors.ts";
import { SplitMix32 } from "./_prng.ts";
import { lloydMaxCodebook } from "./codebook.ts";
import { F16_MAX, f16Bits, f16Value } from "./f16.ts";
import { packCodes, unpackCodes, wordsFor } from "./packing.ts";
import { fwht, rotate, rotationSigns } from "./rotation.ts";

const fr = Math.fround;

/** Options of {@linkcode TurboQuantCodec}. */
export interface CodecOptions {
  /** Values per vector: a multiple of 8. */
  headDim: number;
  /** Stored bits per value, 1 to 8 (in "prod" mode one of them is the QJL sign, so 2 to 8). */
  bits: number;
  /**
   * Values rotated and scaled together: a power of two dividing headDim. Default: the largest
   * power of two up to 32 that divides headDim. `blockSize = headDim` is the paper's form.
   */
  blockSize?: number;
  /** "mse" (default) or "prod": (bits - 1)-bit codes plus a 1-bit QJL residual sketch. */
  mode?: "mse" | "prod";
  /** Seed of the sign pattern and the QJL matrix (a u32). Default 0. */
  seed?: number;
  /** Scale = norm / norm of the decoded unit block (default true). Only with scaleSearch 1. */
  normCorrection?: boolean;
  /**
   * Candidate scales tried per block, spread evenly over 0.7 to 1.3 times its norm, each refit
   * by least squares; the best is kept. Default 9; 1 turns the search off.
   */
  scaleSearch?: number;
}

/**
 * Encoded vectors. Row `i` of `indices` holds vector i's codes packed densely
 * (`wordsPerVector` u32 words, least significant bit first); `scales` holds `numBlocks` f16
 * bit patterns per vector. In "prod" mode `signs` holds `signWordsPerVector` words of QJL
 * sign bits per vector (bit set: non-negative) and `residualNorms` one f16 per vector.
 */
export interface EncodedVectors {
  /** Number of vectors. */
  count: number;
  /** Packed codes, `count * wordsPerVector` words. */
  indices: Uint32Array;
  /** f16 block scales, `count * numBlocks` values. */
  scales: Uint16Array;
  /** prod mode: QJL sign bits, `count * signWordsPerVector` words. */
  signs?: Uint32Array;
  /** prod mode: f16 norm of each vector's residual. */
  residualNorms?: Uint16Array;
}

/**
 * TurboQuant vector codec (pure TypeScript).
 *
 * @example Round trip at 3 bits
 * ```ts
 * import { TurboQuantCodec } from "@turboquant/turboquant";
 * const codec = new TurboQuantCodec({ headDim: 64, bits: 3 });
 * const x = Float32Array.from({ length: 64 * 10 }, () => Math.random() - 0.5);
 * const e = codec.encode(x);
 * const y = codec.decode(e);
 * const scores = codec.dot(x.subarray(0, 64), e); // 10 estimated inner products
 * console.log(codec.bitsPerValue, y.length, scores.length); // 3.5 640 10
 * ```
 */
export class TurboQuantCodec {
  /** Values per vector. */
  readonly headDim: number;
  /** Stored bits per value as configured (code bits, plus the QJL sign in prod mode). */
  readonly bits: number;
  /** Values per rotated block. */
  readonly blockSize: number;
  /** Blocks per vector. */
  readonly numBlocks: number;
  /** "mse" or "prod". */
  readonly mode: "mse" | "prod";
  /** Seed of the sign pattern and of the QJL matrix. */
  readonly seed: number;
  /** Whether scales are norm-corrected (scaleSearch 1 only). */
  readonly normCorrection: boolean;
  /** Candidate scales tried per block. */
  readonly scaleSearch: number;
  /** Bits of each scalar code: `bits`, or `bits - 1` in prod mode. */
  readonly codeBits: number;
  /** u32 words of packed codes per vector. */
  readonly wordsPerVector: number;
  /** u32 words of QJL signs per vector (0 in mse mode). */
  readonly signWordsPerVector: number;
  /** Stored bits per value, scales (and in prod mode signs and residual norm) included. */
  readonly bitsPerValue: number;
  /** Centroids for a unit block's coordinates, ascending, f32. */
  readonly centroids: Float32Array;
  /** Decision boundaries between neighbouring centroids, f32. */
  readonly boundaries: Float32Array;
  /** The +-1 sign pattern applied before the Hadamard transform, one per coordinate. */
  readonly signs: Float32Array;
  /** Factors of the candidate scales times the block norm (f32). */
  readonly scaleFactors: Float32Array;
  /** prod mode: the headDim x headDim Gaussian QJL matrix, row-major, f32. */
  readonly qjlMatrix: Float32Array | undefined;

  /**
   * Builds the codebook, rotation signs and (prod mode) QJL matrix for `options`.
   *
   * @param options Shape, bits and options; invalid values throw TurboQuantError.
   */
  constructor(options: CodecOptions) {
    const o = options ?? ({} as CodecOptions);
    const { headDim, bits } = o;
    check(
      Number.isInteger(headDim) && headDim >= 8 && headDim % 8 === 0 && headDim <= 65536,
      `headDim: ${headDim} is not a multiple of 8 between 8 and 65536`,
    );
    const mode = o.mode ?? "mse";
    check(
      mode === "mse" || mode === "prod",
      `mode: ${JSON.stringify(mode)} is not "mse" or "prod"`,
    );
    const minBits = mode === "prod" ? 2 : 1;
    check(
      Number.isInteger(bits) && bits >= minBits && bits <= 8,
      `bits: ${bits} is not an integer from ${minBits} to 8${
        mode === "prod" ? " in prod mode" : ""
      }`,
    );
    const blockSize = o.blockSize ?? defaultBlockSize(headDim);
    check(
      Number.isInteger(blockSize) && blockSize >= 2 && (blockSize & (blockSize - 1)) === 0 &&
        headDim % blockSize === 0,
      `blockSize: ${blockSize} is not a power of two >= 2 dividing headDim ${headDim}`,
    );
    const seed = o.seed ?? 0;
    check(
      Number.isInteger(seed) && seed >= 0 && seed <= 0xffffffff,
      `seed: ${seed} is not a u32 integer`,
    );
    const normCorrection = o.normCorrection ?? true;
    check(typeof normCorrection === "boolean", `normCorrection: ${normCorrection} is not boolean`);
    const scaleSearch = o.scaleSearch ?? 9;
    check(
      Number.isInteger(scaleSearch) && scaleSearch >= 1 && scaleSearch <= 64,
      `scaleSearch: ${scaleSearch} is not an integer from 1 to 64`,
    );

    this.headDim = headDim;
    this.bits = bits;
    this.blockSize = blockSize;
    this.numBlocks = headDim / blockSize;
    this.mode = mode;
    this.seed = seed;
    this.normCorrection = normCorrection;
    this.scaleSearch = scaleSearch;
    this.codeBits = mode === "prod" ? bits - 1 : bits;
    this.wordsPerVector = wordsFor(headDim, this.codeBits);
    this.signWordsPerVector = mode === "prod" ? wordsFor(headDim, 1) : 0;
    const storedBits = 32 * this.wordsPerVector + 16 * this.numBlocks +
      (mode === "prod" ? 32 * this.signWordsPerVector + 16 : 0);
    this.bitsPerValue = storedBits / headDim;

    const book = lloydMaxCodebook(blockSize, this.codeBits);
    this.centroids = Float32Array.from(book.centroids);
    this.boundaries = Float32Array.from(book.boundaries);
    this.signs = rotationSigns(seed, headDim);
    this.scaleFactors = new Float32Array(scaleSearch);
    for (let j = 0; j < scaleSearch; j++) {
      this.scaleFactors[j] = scaleSearch === 1 ? 1 : 0.7 + (0.6 * j) / (scaleSearch - 1);
    }
    this.qjlMatrix = mode === "prod" ? qjlMatrix(seed, headDim) : undefined;
  }

  /**
   * Encodes `x`, `count * headDim` values (vector-major). Throws TurboQuantError on a bad
   * length, on NaN or Inf, and on a block norm beyond the f16 range.
   */
  encode(x: Float32Array): EncodedVectors {
    check(x instanceof Float32Array, `x: expected a Float32Array, got ${describe(x)}`);
    const d = this.headDim, B = this.blockSize, nb = this.numBlocks;
    check(x.length % d === 0, `x: length ${x.length} is not a multiple of headDim ${d}`);
    const count = x.length / d;
    for (let i = 0; i < x.length; i++) {
      if (!Number.isFinite(x[i])) {
        throw new TurboQuantError(
          "invalid-argument",
          `x: value ${x[i]} of vector ${Math.floor(i / d)} (coordinate ${i % d}) is not finite`,
        );
      }
    }
    const indices = new Uint32Array(count * this.wordsPerVector);
    const scales = new Uint16Array(count * nb);
    const prod = this.mode === "prod";
    const signs = prod ? new Uint32Array(count * this.signWordsPerVector) : undefined;
    const residualNorms = prod ? new Uint16Array(count) : undefined;
    const y = new Float32Array(d);
    const codes = new Uint8Array(d);
    const residual = prod ? new Float32Array(d) : undefined;
    for (let v = 0; v < count; v++) {
      y.set(x.subarray(v * d, v * d + d));
      rotate(y, this.signs, B);
      for (let b = 0; b < nb; b++) {
        this.#encodeBlock(y, b * B, codes, scales, v * nb + b, v);
        if (residual) {
          const s = f16Value(scales[v * nb + b]);
          for (let i = b * B; i < b * B + B; i++) {
            residual[i] = y[i] - fr(s * this.centroids[codes[i]]);
          }
        }
      }
      packCodes(codes, this.codeBits, indices, v * this.wordsPerVector);
      if (residual && signs && residualNorms) {
        residualNorms[v] = f16Bits(Math.min(sqrtF32(sumSquares(residual, 0, d)), F16_MAX));
        this.#sketch(residual, signs, v * this.signWordsPerVector);
      }
    }
    return { count, indices, scales, signs, residualNorms };
  }

  /** Decodes to `count * headDim` values. */
  decode(e: EncodedVectors): Float32Array {
    this.#checkEncoded(e);
    const d = this.headDim, B = this.blockSize, nb = this.numBlocks;
    const out = new Float32Array(e.count * d);
    const codes = new Uint8Array(d);
    for (let v = 0; v < e.count; v++) {
      unpackCodes(e.indices, v * this.wordsPerVector, d, this.codeBits, codes);
      const y = out.subarray(v * d, v * d + d);
      for (let b = 0; b < nb; b++) {
        const s = f16Value(e.scales[v * nb + b]);
        for (let i = b * B; i < b * B + B; i++) y[i] = s * this.centroids[codes[i]];
        fwht(y, b * B, B);
      }
      for (let i = 0; i < d; i++) y[i] *= this.signs[i];
    }
    return out;
  }

  /**
   * Estimated inner products `<query, x_i>` for every encoded vector, computed in the rotated
   * domain without decoding (the query is rotated once). Unbiased in prod mode.
   */
  dot(query: Float32Array, e: EncodedVectors): Float32Array {
    check(
      query instanceof Float32Array && query.length === this.headDim,
      `query: expected a Float32Array of headDim ${this.headDim} values, got ${describe(query)}`,
    );
    for (let i = 0; i < query.length; i++) {
      check(Number.isFinite(query[i]), `query: value ${query[i]} at ${i} is not finite`);
    }
    this.#checkEncoded(e);
    const d = this.headDim, B = this.blockSize, nb = this.numBlocks;
    const q = Float32Array.from(query);
    rotate(q, this.signs, B);
    let sq: Float64Array | undefined;
    if (this.qjlMatrix) {
      sq = new Float64Array(d);
      for (let m = 0; m < d; m++) {
        let acc = 0;
        for (let i = 0; i < d; i++) acc += this.qjlMatrix[m * d + i] * q[i];
        sq[m] = acc;
      }
    }
    const out = new Float32Array(e.count);
    const codes = new Uint8Array(d);
    const qjlScale = Math.sqrt(Math.PI / 2) / d;
    for (let v = 0; v < e.count; v++) {
      unpackCodes(e.indices, v * this.wordsPerVector, d, this.codeBits, codes);
      let total = 0;
      for (let b = 0; b < nb; b++) {
        let acc = 0;
        for (let i = b * B; i < b * B + B; i++) acc += q[i] * this.centroids[codes[i]];
        total += acc * f16Value(e.scales[v * nb + b]);
      }
      if (sq && e.signs && e.residualNorms) {
        let acc = 0;
        const base = v * this.signWordsPerVector;
        for (let m = 0; m < d; m++) {
          acc += (e.signs[base + (m >>> 5)] >>> (m & 31)) & 1 ? sq[m] : -sq[m];
        }
        total += qjlScale * f16Value(e.residualNorms[v]) * acc;
      }
      out[v] = total;
    }
    return out;
  }

  /** Rotates `x` (count * headDim values) in place, the transform applied before coding. */
  rotate(x: Float32Array): void {
    for (let v = 0; v < x.length; v += this.headDim) {
      rotate(x.subarray(v, v + this.headDim), this.signs, this.blockSize);
    }
  }

  /**
   * Codes and f16 scale of one rotated block `y[off .. off + B)`; the scale goes to
   * `scales[scaleIndex]`, the codes to `codes[off ..]`. f32 arithmetic in the kernels' order.
   */
  #encodeBlock(
    y: Float32Array,
    off: number,
    codes: Uint8Array,
    scales: Uint16Array,
    scaleIndex: number,
    vector: number,
  ): void {
    const B = this.blockSize;
    const c = this.centroids;
    const norm = sqrtF32(sumSquares(y, off, B));
    if (norm > F16_MAX) {
      throw new TurboQuantError(
        "invalid-argument",
        `x: block ${(off / B) | 0} of vector ${vector} has norm ${norm}, beyond the f16 scale ` +
          `range (${F16_MAX}); scale the input down`,
      );
    }
    if (this.scaleSearch === 1) {
      this.#quantize(y, off, norm, codes);
      let s = norm;
      if (this.normCorrection && norm > 0) {
        let cc = 0;
        for (let i = off; i < off + B; i++) cc = fr(cc + fr(c[codes[i]] * c[codes[i]]));
        s = fr(norm / sqrtF32(cc));
      }
      scales[scaleIndex] = f16Bits(Math.min(s, F16_MAX));
      return;
    }
    let bestErr = Infinity;
    let bestScale = 0;
    const best = this.#bestCodes;
    for (let j = 0; j < this.scaleSearch; j++) {
      const candidate = fr(norm * this.scaleFactors[j]);
      this.#quantize(y, off, candidate, codes);
      let dot = 0, cc = 0;
      for (let i = off; i < off + B; i++) {
        const ci = c[codes[i]];
        dot = fr(dot + fr(y[i] * ci));
        cc = fr(cc + fr(ci * ci));
      }
      const s16 = f16Bits(Math.min(fr(dot / cc), F16_MAX));
      const s = f16Value(s16);
      let err = 0;
      for (let i = off; i < off + B; i++) {
        const r = fr(y[i] - fr(s * c[codes[i]]));
        err = fr(err + fr(r * r));
      }
      if (err < bestErr) {
        bestErr = err;
        bestScale = s16;
        for (let i = 0; i < B; i++) best[i] = codes[off + i];
      }
    }
    for (let i = 0; i < B; i++) codes[off + i] = best[i];
    scales[scaleIndex] = bestScale;
  }

  #bestCodesBuffer: Uint8Array | undefined;
  get #bestCodes(): Uint8Array {
    return this.#bestCodesBuffer ??= new Uint8Array(this.blockSize);
  }

  /**
   * Nearest centroid of `y[i] / s` for the block, as the number of boundaries below it:
   * a branch-free descent of `codeBits` steps over thresholds `s * boundary` (f32 products,
   * exact in both WGSL and here), so no division decides a code.
   */
  #quantize(y: Float32Array, off: number, s: number, codes: Uint8Array): void {
    const b = this.boundaries;
    const levels = 1 << this.codeBits;
    for (let i = off; i < off + this.blockSize; i++) {
      const v = y[i];
      let code = 0;
      for (let step = levels >>> 1; step >= 1; step >>>= 1) {
        if (v > fr(s * b[code + step - 1])) code += step;
      }
      codes[i] = code;
    }
  }

  /** QJL sign bits of the rotated-domain residual: bit m is set when (S r)_m >= 0. */
  #sketch(r: Float32Array, out: Uint32Array, offset: number): void {
    const d = this.headDim;
    const S = this.qjlMatrix!;
    out.fill(0, offset, offset + this.signWordsPerVector);
    for (let m = 0; m < d; m++) {
      let acc = 0;
      for (let i = 0; i < d; i++) acc = fr(acc + fr(S[m * d + i] * r[i]));
      if (acc >= 0) out[offset + (m >>> 5)] |= 1 << (m & 31);
    }
  }

  #checkEncoded(e: EncodedVectors): void {
    check(
      e !== null && typeof e === "object" && Number.isInteger(e.count) && e.count >= 0,
      `e: expected EncodedVectors, got ${describe(e)}`,
    );
    const n = e.count;
    const want = (name: string, arr: unknown, type: string, len: number) =>
      check(
        arr !== undefined && (arr as { length: number }).length === len &&
          (arr as object).constructor.name === type,
        `e.${name}: expected a ${type} of ${len} values for count ${n}, got ${describe(arr)}`,
      );
    want("indices", e.indices, "Uint32Array", n * this.wordsPerVector);
    want("scales", e.scales, "Uint16Array", n * this.numBlocks);
    if (this.mode === "prod") {
      want("signs", e.signs, "Uint32Array", n * this.signWordsPerVector);
      want("residualNorms", e.residualNorms, "Uint16Array", n);
    }
  }
}

/** The largest power of two up to 32 that divides headDim. */
function defaultBlockSize(headDim: number): number {
  let b = 32;
  while (headDim % b !== 0) b >>= 1;
  return b;
}

function sumSquares(y: Float32Array, off: number, n: number): number {
  let acc = 0;
  for (let i = off; i < off + n; i++) acc = fr(acc + fr(y[i] * y[i]));
  return acc;
}

function sqrtF32(x: number): number {
  return fr(Math.sqrt(x));
}

function qjlMatrix(seed: number, d: number): Float32Array {
  const rng = new SplitMix32(seed ^ 0x0e1f2a3b);
  const m = new Float32Array(d * d);
  for (let i = 0; i < m.length; i++) m[i] = rng.nextGaussian();
  return m;
}
