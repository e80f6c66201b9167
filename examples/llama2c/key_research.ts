/**
 * Experiments on 4-bit keys of small heads (head_dim 8, stories260k): which exact, cheap key
 * transform or code layout makes TurboQuant keys at 4-6 bits close to the f32 run.
 *
 *   deno run -A examples/llama2c/key_research.ts [--seeds 4] [--bits 4,5,6] [--quick]
 *     [--model path] [--text file]
 *
 * Every scheme runs teacher-forced over story.txt (one prefill of the whole text, and again in
 * chunks of 64 tokens so the first-append statistics come from 64 tokens only), values always
 * TurboQuant V4 (block 8, 9-candidate scale search), and reports the mean KL of the next-token
 * distribution against the exact f32 run, averaged over several rotation seeds (the seed alone
 * moves KL by +-10% at K4), plus perplexity change and top-1 agreement.
 *
 * The key pipeline of a scheme, per layer and KV head (all statistics from the layer's first
 * append, like the cache's key centring):
 *   1. centre: none; "first" = subtract the mean key (what SimulatedCodecBackend does);
 *      "prerope" = subtract R(p) mu, mu the mean of the keys un-rotated by RoPE (needs the
 *      RoPE positions; the score shift q.R(p)mu then depends on p and must be added back).
 *   2. channel transform k' = A k, with the query side q' = A^-T q so q.k is unchanged (exact):
 *      none; "key-rms" (A = diag(1 / rms of the centred key channel)); "query" (A =
 *      diag((E q_c^2 / E k_c^2)^(1/4)), the minimiser of E(q.e)^2 for isotropic code error e);
 *      "whiten" (A = C_k^-1/2); "query-full" (A = (C_k^-1 # C_q)^(1/2), the matrix version).
 *      The query statistics come from the first attention call (the first append is coded
 *      lazily, when its queries arrive).
 *   3. codes: "tq" = TurboQuantCodec per head (block 8: one f16 scale per 8 values, 2 bits
 *      per value at head_dim 8); "xhead" = TurboQuantCodec over the 4 heads of a token as one
 *      32-vector (block 32 or 16); "shared" = per-head 8-point rotation but one f16 scale per
 *      token for all heads (0.5 bit per value); "static" = per-head rotation and a fixed
 *      per-coordinate scale from the first append, no stored scale at all; "static-norot" =
 *      the same without rotation (per-channel, KIVI-like).
 *
 * Findings (mean KL over 4 seeds, K bits / V4, prefill | 64-token chunks | decode with a
 * 32-token warm-up): the current centring reaches 0.074 | 0.106 | 0.125 at K4, 0.014 at K5 and
 * 0.0039 at K6. Centring the keys before RoPE ("prerope": mu = mean of R(-p) k_p, subtract
 * R(p) mu, add q.R(p)mu back to the score) reaches 0.0166 | 0.0176 | 0.0181 at K4 (ppl +1.5%),
 * 0.0046 at K5, 0.0019 at K6, and holds on a held-out sampled text (0.018 / 0.005 / 0.002):
 * RoPE turns the large constant part of every pair of key channels into a rotating one that a
 * fixed post-RoPE mean cannot remove. Post-RoPE channel scalings learnt from the first append
 * look good in one prefill (query-aware: 0.034) but do not carry over to later positions
 * (0.18-0.25 in chunks/decode); on top of pre-RoPE centring a per-channel scale adds little
 * (query-aware 0.0088 | 0.0146 | 0.0153). Larger or shared scale blocks, more scale-search
 * candidates, static scales and per-layer bits lose to pre-RoPE centring at equal bits.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { lloydMaxCodebook, TurboQuantCodec } from "../../mod.ts";
import { unrotate } from "../../src/codec/rotation.ts";
import {
  type AttentionOptions,
  CpuAttentionBackend,
  SimulatedCodecBackend,
} from "./attention_backend.ts";
import {
  type BackendFactory,
  compareRuns,
  cpuBackendFactory,
  teacherForced,
  type TeacherForcedOptions,
  type TeacherForcedResult,
} from "./eval.ts";
import { codecRoundTrip, GRID_BITS, q4_0Blocks } from "./eval_grid.ts";
import { LlamaDecoder, ROPE_THETA } from "./forward.ts";
import { generate } from "./generate.ts";
import { DEFAULT_MODEL_URL, type LlamaConfig, type LlamaModel, loadModel } from "./model.ts";
import { Tokenizer } from "./tokenizer.ts";

/** Step 1 of the key pipeline. */
export type Centring = "none" | "first" | "prerope";
/** Step 2 of the key pipeline. */
export type ChannelTransform =
  | "none"
  | "key-rms"
  | "key-rms-pair"
  | "query"
  | "query-pair"
  | "whiten"
  | "query-full";
/** Step 3 of the key pipeline. */
export type KeyCodes =
  | { kind: "tq"; blockSize?: number; scaleSearch?: number }
  | { kind: "xhead"; blockSize: number }
  | { kind: "shared" }
  | { kind: "static" }
  | { kind: "static-norot" }
  | { kind: "q4_0" };

/** A key scheme: the three steps and the key bits (one number, or one per layer). */
export interface KeyScheme {
  /** Label in the table. */
  name: string;
  /** Centring. */
  centre: Centring;
  /** Exact channel transform folded into the query. */
  transform: ChannelTransform;
  /** Code layout. */
  codes: KeyCodes;
}

/** Stored bits per key value of a code layout at `bits` code bits (head_dim d, H KV heads). */
export function keyBitsPerValue(codes: KeyCodes, bits: number, d: number, heads: number): number {
  switch (codes.kind) {
    case "tq":
      return bits + 16 / (codes.blockSize ?? Math.min(32, d));
    case "xhead":
      return bits + 16 / codes.blockSize;
    case "shared":
      return bits + 16 / (d * heads);
    case "static":
    case "static-norot":
      return bits;
    case "q4_0":
      return 4 + 16 / Math.min(32, d);
  }
}

// ---------------------------------------------------------------------------------------------
// Small dense linear algebra (d x d, row-major, f64).

/** Eigen-decomposition of a symmetric matrix by cyclic Jacobi: a = V diag(w) V^T. */
export function symmetricEigen(
  a: Float64Array,
  n: number,
): { values: Float64Array; vectors: Float64Array } {
  const m = Float64Array.from(a);
  const v = new Float64Array(n * n);
  for (let i = 0; i < n; i++) v[i * n + i] = 1;
  for (let sweep = 0; sweep < 100; sweep++) {
    let off = 0;
    for (let p = 0; p < n; p++) for (let q = p + 1; q < n; q++) off += m[p * n + q] ** 2;
    if (off < 1e-22) break;
    for (let p = 0; p < n; p++) {
      for (let q = p + 1; q < n; q++) {
        const apq = m[p * n + q];
        if (Math.abs(apq) < 1e-300) continue;
        const theta = (m[q * n + q] - m[p * n + p]) / (2 * apq);
        const t = Math.sign(theta || 1) / (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const c = 1 / Math.sqrt(t * t + 1);
        const s = t * c;
        for (let k = 0; k < n; k++) {
          const mkp = m[k * n + p], mkq = m[k * n + q];
          m[k * n + p] = c * mkp - s * mkq;
          m[k * n + q] = s * mkp + c * mkq;
        }
        for (let k = 0; k < n; k++) {
          const mpk = m[p * n + k], mqk = m[q * n + k];
          m[p * n + k] = c * mpk - s * mqk;
          m[q * n + k] = s * mpk + c * mqk;
        }
        for (let k = 0; k < n; k++) {
          const vkp = v[k * n + p], vkq = v[k * n + q];
          v[k * n + p] = c * vkp - s * vkq;
          v[k * n + q] = s * vkp + c * vkq;
        }
      }
    }
  }
  const values = new Float64Array(n);
  for (let i = 0; i < n; i++) values[i] = m[i * n + i];
  return { values, vectors: v };
}

/** f(a) of a symmetric matrix through its eigenvalues (eigenvalues floored at `floor`). */
function matrixFunction(
  a: Float64Array,
  n: number,
  f: (x: number) => number,
  floor: number,
): Float64Array {
  const { values, vectors } = symmetricEigen(a, n);
  const out = new Float64Array(n * n);
  for (let k = 0; k < n; k++) {
    const fk = f(Math.max(values[k], floor));
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < n; j++) out[i * n + j] += vectors[i * n + k] * fk * vectors[j * n + k];
    }
  }
  return out;
}

function matMul(a: Float64Array, b: Float64Array, n: number): Float64Array {
  const out = new Float64Array(n * n);
  for (let i = 0; i < n; i++) {
    for (let k = 0; k < n; k++) {
      const aik = a[i * n + k];
      for (let j = 0; j < n; j++) out[i * n + j] += aik * b[k * n + j];
    }
  }
  return out;
}

/** Inverse by Gauss-Jordan with partial pivoting. */
function matInverse(a: Float64Array, n: number): Float64Array {
  const m = Float64Array.from(a);
  const inv = new Float64Array(n * n);
  for (let i = 0; i < n; i++) inv[i * n + i] = 1;
  for (let c = 0; c < n; c++) {
    let p = c;
    for (let r = c + 1; r < n; r++) if (Math.abs(m[r * n + c]) > Math.abs(m[p * n + c])) p = r;
    for (let j = 0; j < n; j++) {
      [m[c * n + j], m[p * n + j]] = [m[p * n + j], m[c * n + j]];
      [inv[c * n + j], inv[p * n + j]] = [inv[p * n + j], inv[c * n + j]];
    }
    const piv = m[c * n + c];
    for (let j = 0; j < n; j++) {
      m[c * n + j] /= piv;
      inv[c * n + j] /= piv;
    }
    for (let r = 0; r < n; r++) {
      if (r === c) continue;
      const f = m[r * n + c];
      if (f === 0) continue;
      for (let j = 0; j < n; j++) {
        m[r * n + j] -= f * m[c * n + j];
        inv[r * n + j] -= f * inv[c * n + j];
      }
    }
  }
  return inv;
}

// ---------------------------------------------------------------------------------------------
// The key pipeline.

interface HeadStats {
  /** Centre (post-RoPE mean, or pre-RoPE mean for "prerope"), d values. */
  mu: Float64Array;
  /** A and A^-1, d x d. */
  a: Float64Array;
  aInv: Float64Array;
}

interface LayerState {
  heads: HeadStats[];
  /** Per-coordinate static scales of "static" codes ([H * d]), learnt on the first append. */
  staticScale?: Float64Array;
}

/** RoPE angle of pair i at position p (llama2.c: p / theta^(2i / d)). */
function ropeAngle(p: number, i: number, d: number): number {
  return p / Math.pow(ROPE_THETA, (2 * i) / d);
}

/** x (one d-vector at offset o) rotated by RoPE at position p, sign +1, or back with -1. */
function ropeInPlace(
  x: Float64Array | Float32Array,
  o: number,
  d: number,
  p: number,
  sign: number,
): void {
  for (let i = 0; i < d / 2; i++) {
    const ang = sign * ropeAngle(p, i, d);
    const c = Math.cos(ang), s = Math.sin(ang);
    const a = x[o + 2 * i], b = x[o + 2 * i + 1];
    x[o + 2 * i] = a * c - b * s;
    x[o + 2 * i + 1] = a * s + b * c;
  }
}

/** Options of {@linkcode ResearchBackend}. */
export interface ResearchBackendOptions {
  /** Model shape. */
  config: LlamaConfig;
  /** The key scheme. */
  scheme: KeyScheme;
  /** Key bits, one for all layers or one per layer (f32 keys where a layer's entry is 0). */
  keyBits: number | readonly number[];
  /** Value bits (0: f32 values). */
  valueBits: number;
  /** Rotation seed of the key and value codecs. */
  seed: number;
  /**
   * Tokens a layer keeps raw (exact) before its statistics are learnt from them and they are
   * coded; 0 (default): the first append, however short.
   */
  warmup?: number;
}

/** Exact attention over keys that went through a {@linkcode KeyScheme} and TurboQuant values. */
export class ResearchBackend extends CpuAttentionBackend {
  readonly #o: ResearchBackendOptions;
  readonly #needsQueries: boolean;
  #state: (LayerState | null)[];
  #raw: ({ k: Float32Array[]; v: Float32Array[]; tokens: number } | null)[];
  #queryMoments: ({ sums: Float64Array[]; count: number } | null)[];
  readonly #codecs = new Map<string, TurboQuantCodec>();

  /** @param o Shape, scheme, bits and seed. */
  constructor(o: ResearchBackendOptions) {
    super({
      numLayers: o.config.numLayers,
      numKvHeads: o.config.numKvHeads,
      headDim: o.config.headDim,
      initialCapacity: Math.min(o.config.seqLen, 512),
    });
    this.#o = o;
    this.#needsQueries = o.scheme.transform.startsWith("query");
    this.#state = new Array(o.config.numLayers).fill(null);
    this.#raw = new Array(o.config.numLayers).fill(null);
    this.#queryMoments = new Array(o.config.numLayers).fill(null);
  }

  #codec(headDim: number, bits: number, blockSize?: number, scaleSearch?: number): TurboQuantCodec {
    const key = `${headDim}/${bits}/${blockSize}/${scaleSearch}`;
    let c = this.#codecs.get(key);
    if (!c) {
      c = new TurboQuantCodec({ headDim, bits, blockSize, scaleSearch, seed: this.#o.seed });
      this.#codecs.set(key, c);
    }
    return c;
  }

  /**
   * Until a layer's statistics are learnt, keeps its K/V raw (exact attention over them).
   * Once `warmup` tokens are in (and, for query-aware schemes, their queries were seen), learns
   * the statistics from all of them and codes them all (the cache would do the same).
   */
  override async append(layer: number, k: Float32Array, v: Float32Array): Promise<void> {
    if (this.#state[layer]) return super.append(layer, k, v);
    const raw = this.#raw[layer] ??= { k: [], v: [], tokens: 0 };
    const tokens = k.length / (this.numKvHeads * this.headDim);
    raw.k.push(k.slice());
    raw.v.push(v.slice());
    raw.tokens += tokens;
    await super.append(layer, k, v);
    if (!this.#needsQueries) await this.#maybeLearn(layer);
  }

  /** Accumulates query statistics during the warm-up, then attends. */
  override async attention(
    layer: number,
    q: Float32Array,
    options: AttentionOptions,
  ): Promise<Float32Array> {
    if (!this.#state[layer] && this.#needsQueries) {
      this.#addQueryMoments(layer, q, options.numHeads);
      await this.#maybeLearn(layer);
    }
    return super.attention(layer, q, options);
  }

  async #maybeLearn(layer: number): Promise<void> {
    const raw = this.#raw[layer];
    if (!raw || raw.tokens < Math.max(1, this.#o.warmup ?? 0)) return;
    const k = concatHeads(raw.k, this.numKvHeads, this.headDim);
    const v = concatHeads(raw.v, this.numKvHeads, this.headDim);
    this.#raw[layer] = null;
    await super.truncate(0, layer);
    this.#state[layer] = this.#learnStats(layer, k, raw.tokens, 0);
    await super.append(layer, k, v);
  }

  /** Adds E[q q^T] per KV head (over its query heads and tokens) to the layer's running sums. */
  #addQueryMoments(layer: number, q: Float32Array, numHeads: number): void {
    const d = this.headDim, H = this.numKvHeads;
    const group = numHeads / H;
    const T = q.length / (numHeads * d);
    const acc = this.#queryMoments[layer] ??= {
      sums: Array.from({ length: H }, () => new Float64Array(d * d)),
      count: 0,
    };
    for (let h = 0; h < H; h++) {
      const m = acc.sums[h];
      for (let g = 0; g < group; g++) {
        const qh = h * group + g;
        for (let t = 0; t < T; t++) {
          const o = (qh * T + t) * d;
          for (let i = 0; i < d; i++) {
            for (let j = 0; j < d; j++) m[i * d + j] += q[o + i] * q[o + j];
          }
        }
      }
    }
    acc.count += group * T;
  }

  #queryMoment(layer: number, h: number): Float64Array {
    const acc = this.#queryMoments[layer]!;
    return acc.sums[h].map((x) => x / acc.count);
  }

  override reset(): Promise<void> {
    this.#state.fill(null);
    this.#raw.fill(null);
    this.#queryMoments.fill(null);
    return super.reset();
  }

  /** Centre (per position) of key t of head h. */
  #centreOf(st: HeadStats, pos: number, out: Float64Array): void {
    out.set(st.mu);
    if (this.#o.scheme.centre === "prerope") ropeInPlace(out, 0, this.headDim, pos, 1);
  }

  #learnStats(layer: number, k: Float32Array, tokens: number, base: number): LayerState {
    const d = this.headDim, H = this.numKvHeads;
    const { centre, transform } = this.#o.scheme;
    const heads: HeadStats[] = [];
    const x = new Float64Array(d);
    for (let h = 0; h < H; h++) {
      const mu = new Float64Array(d);
      if (centre !== "none") {
        for (let t = 0; t < tokens; t++) {
          for (let j = 0; j < d; j++) x[j] = k[(h * tokens + t) * d + j];
          if (centre === "prerope") ropeInPlace(x, 0, d, base + t, -1);
          for (let j = 0; j < d; j++) mu[j] += x[j] / tokens;
        }
      }
      // Second moments of the centred keys.
      const cov = new Float64Array(d * d);
      const c = new Float64Array(d);
      const st: HeadStats = { mu, a: new Float64Array(0), aInv: new Float64Array(0) };
      for (let t = 0; t < tokens; t++) {
        this.#centreOf(st, base + t, c);
        for (let j = 0; j < d; j++) x[j] = k[(h * tokens + t) * d + j] - c[j];
        for (let i = 0; i < d; i++) {
          for (let j = 0; j < d; j++) cov[i * d + j] += (x[i] * x[j]) / tokens;
        }
      }
      let trace = 0;
      for (let i = 0; i < d; i++) trace += cov[i * d + i];
      const floor = Math.max(trace / d * 1e-4, 1e-12);
      let a: Float64Array = new Float64Array(d * d);
      if (transform === "none" || tokens < 2 || trace === 0) {
        // Too few keys for second moments (e.g. BOS alone): no channel transform.
        for (let i = 0; i < d; i++) a[i * d + i] = 1;
      } else if (transform === "key-rms") {
        for (let i = 0; i < d; i++) a[i * d + i] = 1 / Math.sqrt(Math.max(cov[i * d + i], floor));
      } else if (transform === "query") {
        const qm = this.#queryMoment(layer, h);
        for (let i = 0; i < d; i++) {
          a[i * d + i] = Math.pow(
            Math.max(qm[i * d + i], 1e-12) / Math.max(cov[i * d + i], floor),
            0.25,
          );
        }
      } else if (transform === "key-rms-pair") {
        for (let i = 0; i < d; i += 2) {
          const e = Math.max((cov[i * d + i] + cov[(i + 1) * d + i + 1]) / 2, floor);
          a[i * d + i] = a[(i + 1) * d + i + 1] = 1 / Math.sqrt(e);
        }
      } else if (transform === "query-pair") {
        const qm = this.#queryMoment(layer, h);
        for (let i = 0; i < d; i += 2) {
          const qe = Math.max(qm[i * d + i] + qm[(i + 1) * d + i + 1], 1e-12);
          const ke = Math.max(cov[i * d + i] + cov[(i + 1) * d + i + 1], floor);
          a[i * d + i] = a[(i + 1) * d + i + 1] = Math.pow(qe / ke, 0.25);
        }
      } else if (transform === "whiten") {
        a = matrixFunction(cov, d, (e) => 1 / Math.sqrt(e), floor);
      } else {
        // M = C^-1 # Q = C^-1/2 (C^1/2 Q C^1/2)^1/2 C^-1/2; A = M^1/2 (symmetric).
        const qm = this.#queryMoment(layer, h);
        const ch = matrixFunction(cov, d, Math.sqrt, floor);
        const chInv = matrixFunction(cov, d, (e) => 1 / Math.sqrt(e), floor);
        const inner = matrixFunction(matMul(matMul(ch, qm, d), ch, d), d, Math.sqrt, 1e-12);
        const m = matMul(matMul(chInv, inner, d), chInv, d);
        a = matrixFunction(m, d, Math.sqrt, 1e-12);
      }
      // Normalise so that A keeps the total key energy (the codes are scale-free anyway; this
      // keeps values well inside the f16 range).
      let e = 0;
      const ac = matMul(matMul(a, cov, d), transpose(a, d), d);
      for (let i = 0; i < d; i++) e += ac[i * d + i];
      const f = e > 0 ? Math.sqrt(trace / e) : 1;
      for (let i = 0; i < d * d; i++) a[i] *= f;
      st.a = a;
      st.aInv = matInverse(a, d);
      heads.push(st);
    }
    return { heads };
  }

  protected override transform(
    layer: number,
    k: Float32Array,
    v: Float32Array,
    tokens: number,
  ): { k: Float32Array; v: Float32Array } {
    const d = this.headDim, H = this.numKvHeads;
    if (!this.#state[layer]) return { k, v }; // warm-up: raw until the statistics are learnt
    const base = this.seqLen(layer);
    const kb = this.#o.keyBits;
    const bits = typeof kb === "number" ? kb : kb[layer];
    const vOut = this.#o.valueBits > 0 ? this.#codecRoundTrip(v, this.#o.valueBits) : v;
    if (bits === 0) return { k, v: vOut };
    const st = this.#state[layer]!;
    // Centre and transform.
    const x = new Float32Array(k.length);
    const c = new Float64Array(d);
    for (let h = 0; h < H; h++) {
      const hs = st.heads[h];
      for (let t = 0; t < tokens; t++) {
        const o = (h * tokens + t) * d;
        this.#centreOf(hs, base + t, c);
        for (let i = 0; i < d; i++) {
          let acc = 0;
          for (let j = 0; j < d; j++) acc += hs.a[i * d + j] * (k[o + j] - c[j]);
          x[o + i] = acc;
        }
      }
    }
    const y = this.#quantizeKeys(x, tokens, bits, st);
    // Undo the transform and the centre.
    const out = new Float32Array(k.length);
    for (let h = 0; h < H; h++) {
      const hs = st.heads[h];
      for (let t = 0; t < tokens; t++) {
        const o = (h * tokens + t) * d;
        this.#centreOf(hs, base + t, c);
        for (let i = 0; i < d; i++) {
          let acc = 0;
          for (let j = 0; j < d; j++) acc += hs.aInv[i * d + j] * y[o + j];
          out[o + i] = acc + c[i];
        }
      }
    }
    return { k: out, v: vOut };
  }

  #codecRoundTrip(x: Float32Array, bits: number): Float32Array {
    const c = this.#codec(this.headDim, bits);
    return c.decode(c.encode(x));
  }

  /** Step 3 on [H, tokens, d] values. */
  #quantizeKeys(x: Float32Array, tokens: number, bits: number, st: LayerState): Float32Array {
    const d = this.headDim, H = this.numKvHeads;
    const codes = this.#o.scheme.codes;
    switch (codes.kind) {
      case "tq": {
        const c = this.#codec(d, bits, codes.blockSize, codes.scaleSearch);
        return c.decode(c.encode(x));
      }
      case "q4_0":
        return q4_0Blocks(x, Math.min(32, d));
      case "xhead": {
        const c = this.#codec(H * d, bits, codes.blockSize);
        return fromTokenMajor(c.decode(c.encode(toTokenMajor(x, H, tokens, d))), H, tokens, d);
      }
      case "shared":
        return this.#sharedScale(x, tokens, bits);
      case "static":
      case "static-norot":
        return this.#staticScale(x, tokens, bits, st, codes.kind === "static");
    }
  }

  /** Per-head rotation, then one searched f16 scale per token over all H * d values. */
  #sharedScale(x: Float32Array, tokens: number, bits: number): Float32Array {
    const d = this.headDim, H = this.numKvHeads, n = H * d;
    const rot = this.#codec(d, bits);
    const y = Float32Array.from(x);
    rot.rotate(y);
    const tm = toTokenMajor(y, H, tokens, d);
    const book = lloydMaxCodebook(n, bits);
    const q = new Float32Array(tm.length);
    for (let t = 0; t < tokens; t++) {
      searchScale(tm, t * n, n, book.centroids, book.boundaries, 9, q);
    }
    const back = fromTokenMajor(q, H, tokens, d);
    for (let v = 0; v < H * tokens; v++) unrotate(back.subarray(v * d, v * d + d), rot.signs, d);
    return back;
  }

  /**
   * Fixed per-coordinate scales (learnt on the first append: sigma per coordinate, times the
   * factor that minimises that append's MSE), Gaussian Lloyd-Max codes, no stored scale.
   */
  #staticScale(
    x: Float32Array,
    tokens: number,
    bits: number,
    st: LayerState,
    rotateFirst: boolean,
  ): Float32Array {
    const d = this.headDim, H = this.numKvHeads;
    const rot = this.#codec(d, bits);
    const y = Float32Array.from(x);
    if (rotateFirst) rot.rotate(y);
    const g = gaussianCodebook(bits);
    if (!st.staticScale) {
      const sigma = new Float64Array(H * d);
      for (let h = 0; h < H; h++) {
        for (let j = 0; j < d; j++) {
          let s2 = 0;
          for (let t = 0; t < tokens; t++) s2 += y[(h * tokens + t) * d + j] ** 2;
          sigma[h * d + j] = Math.sqrt(s2 / tokens) || 1e-6;
        }
      }
      // One factor per head: the one with the least MSE on this append.
      const scale = new Float64Array(H * d);
      for (let h = 0; h < H; h++) {
        let best = Infinity, bestF = 1;
        for (let f = 0.5; f <= 2.0001; f += 0.05) {
          let err = 0;
          for (let t = 0; t < tokens; t++) {
            for (let j = 0; j < d; j++) {
              const s = f * sigma[h * d + j];
              const val = y[(h * tokens + t) * d + j];
              err += (val - s * g.centroids[nearest(val / s, g.boundaries)]) ** 2;
            }
          }
          if (err < best) {
            best = err;
            bestF = f;
          }
        }
        for (let j = 0; j < d; j++) scale[h * d + j] = bestF * sigma[h * d + j];
      }
      st.staticScale = scale;
    }
    const s = st.staticScale;
    const out = new Float32Array(y.length);
    for (let h = 0; h < H; h++) {
      for (let t = 0; t < tokens; t++) {
        const o = (h * tokens + t) * d;
        for (let j = 0; j < d; j++) {
          const sc = s[h * d + j];
          out[o + j] = sc * g.centroids[nearest(y[o + j] / sc, g.boundaries)];
        }
      }
    }
    if (rotateFirst) {
      for (let v = 0; v < H * tokens; v++) unrotate(out.subarray(v * d, v * d + d), rot.signs, d);
    }
    return out;
  }
}

/** Concatenates appends of [H, T_i, d] into [H, sum T_i, d]. */
function concatHeads(parts: Float32Array[], H: number, d: number): Float32Array {
  const total = parts.reduce((a, p) => a + p.length, 0) / (H * d);
  const out = new Float32Array(total * H * d);
  let t0 = 0;
  for (const p of parts) {
    const T = p.length / (H * d);
    for (let h = 0; h < H; h++) {
      out.set(p.subarray(h * T * d, (h + 1) * T * d), (h * total + t0) * d);
    }
    t0 += T;
  }
  return out;
}

function transpose(a: Float64Array, n: number): Float64Array {
  const t = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) t[j * n + i] = a[i * n + j];
  return t;
}

/** [H, T, d] -> [T, H * d]. */
function toTokenMajor(x: Float32Array, H: number, T: number, d: number): Float32Array {
  const out = new Float32Array(x.length);
  for (let h = 0; h < H; h++) {
    for (let t = 0; t < T; t++) {
      out.set(x.subarray((h * T + t) * d, (h * T + t + 1) * d), (t * H + h) * d);
    }
  }
  return out;
}

/** [T, H * d] -> [H, T, d]. */
function fromTokenMajor(x: Float32Array, H: number, T: number, d: number): Float32Array {
  const out = new Float32Array(x.length);
  for (let h = 0; h < H; h++) {
    for (let t = 0; t < T; t++) {
      out.set(x.subarray((t * H + h) * d, (t * H + h + 1) * d), (h * T + t) * d);
    }
  }
  return out;
}

/** Index of the centroid for value v given ascending boundaries. */
function nearest(v: number, boundaries: ArrayLike<number>): number {
  let lo = 0, hi = boundaries.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (v > boundaries[mid]) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

const gaussianBooks = new Map<number, { centroids: Float64Array; boundaries: Float64Array }>();
/** Lloyd-Max codebook of a standard normal (the unit-sphere one at d = 4096, times 64). */
function gaussianCodebook(bits: number): { centroids: Float64Array; boundaries: Float64Array } {
  let g = gaussianBooks.get(bits);
  if (!g) {
    const b = lloydMaxCodebook(4096, bits);
    g = {
      centroids: Float64Array.from(b.centroids, (c) => c * 64),
      boundaries: Float64Array.from(b.boundaries, (c) => c * 64),
    };
    gaussianBooks.set(bits, g);
  }
  return g;
}

/**
 * The codec's scale search on one group of n values (candidates 0.7..1.3 times the norm, each
 * refit by least squares and rounded to f16; least squared error wins); writes the decoded
 * values to out.
 */
function searchScale(
  y: Float32Array,
  off: number,
  n: number,
  centroids: ArrayLike<number>,
  boundaries: ArrayLike<number>,
  candidates: number,
  out: Float32Array,
): void {
  let norm = 0;
  for (let i = off; i < off + n; i++) norm += y[i] * y[i];
  norm = Math.sqrt(norm);
  if (norm === 0) {
    out.fill(0, off, off + n);
    return;
  }
  const codes = new Uint8Array(n);
  let bestErr = Infinity, bestS = 0;
  let best = new Uint8Array(n);
  for (let j = 0; j < candidates; j++) {
    const s0 = norm * (candidates === 1 ? 1 : 0.7 + (0.6 * j) / (candidates - 1));
    let dot = 0, cc = 0;
    for (let i = 0; i < n; i++) {
      codes[i] = nearest(y[off + i] / s0, boundaries);
      const c = centroids[codes[i]];
      dot += y[off + i] * c;
      cc += c * c;
    }
    const s = Math.f16round(dot / cc);
    let err = 0;
    for (let i = 0; i < n; i++) err += (y[off + i] - s * centroids[codes[i]]) ** 2;
    if (err < bestErr) {
      bestErr = err;
      bestS = s;
      best = codes.slice();
    }
  }
  for (let i = 0; i < n; i++) out[off + i] = bestS * centroids[best[i]];
}

// ---------------------------------------------------------------------------------------------
// Experiments.

/** Shorthand for a scheme. */
function scheme(
  name: string,
  centre: Centring,
  transform: ChannelTransform,
  codes: KeyCodes,
): KeyScheme {
  return { name, centre, transform, codes };
}

const TQ: KeyCodes = { kind: "tq" };

/** The current cache: key centring by the first append's mean, TurboQuant block 8. */
export const DEFAULT_SCHEME: KeyScheme = scheme(
  "TQ, centred (current default)",
  "first",
  "none",
  TQ,
);
/** The recommendation: centre keys by their pre-RoPE mean, re-rotated to each position. */
export const RECOMMENDED_SCHEME: KeyScheme = scheme("TQ, pre-RoPE centred", "prerope", "none", TQ);

/** The schemes of the main table. */
export const SCHEMES: readonly KeyScheme[] = [
  scheme("TQ, no centring", "none", "none", TQ),
  DEFAULT_SCHEME,
  scheme("q4_0 (block 8), centred", "first", "none", { kind: "q4_0" }),
  scheme("TQ, centred, scaleSearch 1", "first", "none", { kind: "tq", scaleSearch: 1 }),
  scheme("TQ, centred, scaleSearch 33", "first", "none", { kind: "tq", scaleSearch: 33 }),
  scheme("TQ, centred, block 4", "first", "none", { kind: "tq", blockSize: 4 }),
  scheme("TQ, centred + key-RMS per channel", "first", "key-rms", TQ),
  scheme("TQ, centred + key-RMS per pair", "first", "key-rms-pair", TQ),
  scheme("TQ, centred + query-aware per channel", "first", "query", TQ),
  scheme("TQ, centred + whitening", "first", "whiten", TQ),
  scheme("TQ, centred + query-aware full matrix", "first", "query-full", TQ),
  scheme("TQ across heads, block 32, centred", "first", "none", { kind: "xhead", blockSize: 32 }),
  scheme("TQ across heads, block 32, query-aware", "first", "query", {
    kind: "xhead",
    blockSize: 32,
  }),
  scheme("shared f16 scale per token, query-aware", "first", "query", { kind: "shared" }),
  scheme("static scales, rotated, query-aware", "first", "query", { kind: "static" }),
  scheme("static per-channel (no rotation), query-aware", "first", "query", {
    kind: "static-norot",
  }),
  scheme("q4_0 (block 8), pre-RoPE centred", "prerope", "none", { kind: "q4_0" }),
  RECOMMENDED_SCHEME,
  scheme("TQ, pre-RoPE, scaleSearch 1", "prerope", "none", { kind: "tq", scaleSearch: 1 }),
  scheme("TQ, pre-RoPE, block 4", "prerope", "none", { kind: "tq", blockSize: 4 }),
  scheme("TQ, pre-RoPE + key-RMS per channel", "prerope", "key-rms", TQ),
  scheme("TQ, pre-RoPE + key-RMS per pair", "prerope", "key-rms-pair", TQ),
  scheme("TQ, pre-RoPE + query-aware per channel", "prerope", "query", TQ),
  scheme("TQ, pre-RoPE + query-aware per pair", "prerope", "query-pair", TQ),
  scheme("TQ, pre-RoPE + query-aware full matrix", "prerope", "query-full", TQ),
  scheme("TQ across heads, block 32, pre-RoPE", "prerope", "none", {
    kind: "xhead",
    blockSize: 32,
  }),
  scheme("TQ across heads, block 32, pre-RoPE + key-RMS", "prerope", "key-rms", {
    kind: "xhead",
    blockSize: 32,
  }),
  scheme("shared f16 scale per token, pre-RoPE + key-RMS", "prerope", "key-rms", {
    kind: "shared",
  }),
];

/** Schemes run at 5 and 6 bits too (the rest only at 4). */
export const HEADLINE_SCHEMES: readonly string[] = [
  DEFAULT_SCHEME.name,
  "TQ, centred + query-aware per channel",
  RECOMMENDED_SCHEME.name,
  "TQ, pre-RoPE + key-RMS per channel",
  "TQ, pre-RoPE + query-aware per channel",
  "TQ across heads, block 32, pre-RoPE",
  "TQ across heads, block 32, pre-RoPE + key-RMS",
];

/** How a text is fed and when the statistics are learnt. */
export interface Scenario {
  /** Column label. */
  name: string;
  /** Feeding. */
  run: TeacherForcedOptions;
  /** Warm-up tokens (see {@linkcode ResearchBackendOptions.warmup}). */
  warmup: number;
}

/** The three scenarios of the table. */
export const SCENARIOS: readonly Scenario[] = [
  { name: "prefill", run: { mode: "prefill" }, warmup: 0 },
  { name: "64-token chunks", run: { mode: "prefill", chunkSize: 64 }, warmup: 0 },
  { name: "decode, warm-up 32", run: { mode: "decode" }, warmup: 32 },
];

/** One measured cell: a scheme at some key bits, averaged over seeds. */
export interface Measurement {
  /** Scheme label. */
  scheme: string;
  /** Key code bits. */
  keyBits: number;
  /** Stored bits per key value. */
  bitsPerValue: number;
  /** Per scenario: mean KL over seeds, its sd, mean ppl change and top-1 agreement. */
  results: { kl: number; klSd: number; pplChange: number; top1: number }[];
}

/** Runs a factory over seeds; returns mean KL, its sd, ppl change and top-1. */
export async function measure(
  model: LlamaModel,
  tokens: readonly number[],
  reference: TeacherForcedResult,
  make: (seed: number) => BackendFactory,
  seeds: number,
  run: TeacherForcedOptions = {},
): Promise<{ kl: number; klSd: number; pplChange: number; top1: number }> {
  const kls: number[] = [];
  let ppl = 0, top1 = 0;
  for (let s = 0; s < seeds; s++) {
    const r = await teacherForced(model, tokens, make(s), run);
    const c = compareRuns(reference, r);
    kls.push(c.meanKl);
    ppl += c.perplexityChange / seeds;
    top1 += c.top1Agreement / seeds;
  }
  const kl = kls.reduce((a, b) => a + b, 0) / seeds;
  const klSd = Math.sqrt(kls.reduce((a, b) => a + (b - kl) ** 2, 0) / Math.max(1, seeds - 1));
  return { kl, klSd, pplChange: ppl, top1 };
}

/** Factory of a scheme at the given key bits (TurboQuant values at valueBits, 0 = f32). */
export function schemeFactory(
  scheme: KeyScheme,
  keyBits: number | readonly number[],
  valueBits = 4,
  warmup = 0,
): (seed: number) => BackendFactory {
  return (seed: number): BackendFactory => (config: LlamaConfig) =>
    new ResearchBackend({ config, scheme, keyBits, valueBits, seed, warmup });
}

/** Evaluates schemes x bits x scenarios; prints progress on stderr. */
export async function runSchemes(
  model: LlamaModel,
  tokens: readonly number[],
  schemes: readonly KeyScheme[],
  bitsList: readonly number[],
  seeds: number,
  scenarios: readonly Scenario[] = SCENARIOS,
): Promise<Measurement[]> {
  const reference = await teacherForced(model, tokens, cpuBackendFactory);
  const out: Measurement[] = [];
  const c = model.config;
  for (const bits of bitsList) {
    for (const s of schemes) {
      if (bits !== bitsList[0] && !HEADLINE_SCHEMES.includes(s.name)) continue;
      if (s.codes.kind === "q4_0" && bits !== 4) continue;
      const results = [];
      for (const sc of scenarios) {
        results.push(
          await measure(
            model,
            tokens,
            reference,
            schemeFactory(s, bits, 4, sc.warmup),
            seeds,
            sc.run,
          ),
        );
      }
      const m: Measurement = {
        scheme: s.name,
        keyBits: bits,
        bitsPerValue: keyBitsPerValue(s.codes, bits, c.headDim, c.numKvHeads),
        results,
      };
      out.push(m);
      console.error(
        `K${bits} ${s.name}: ` +
          results.map((r, i) => `${scenarios[i].name} KL ${r.kl.toFixed(4)}`).join(", "),
      );
    }
  }
  return out;
}

/** Markdown table of measurements. */
export function formatMeasurements(
  ms: readonly Measurement[],
  seeds: number,
  scenarios: readonly Scenario[] = SCENARIOS,
): string {
  const lines = [
    `| key scheme (V: TurboQuant 4 bits) | K bits | K bits/value | ` +
    `KL ${scenarios[0].name} (sd over ${seeds} seeds) | ppl change % | top-1 | ` +
    scenarios.slice(1).map((s) => `KL ${s.name}`).join(" | ") + " |",
    "| --- | ---: | ---: | ---: | ---: | ---: |" + " ---: |".repeat(scenarios.length - 1),
  ];
  for (const m of ms) {
    const r = m.results[0];
    lines.push(
      `| ${m.scheme} | ${m.keyBits} | ${+m.bitsPerValue.toFixed(2)} | ` +
        `${r.kl.toFixed(4)} (${r.klSd.toFixed(4)}) | ${r.pplChange >= 0 ? "+" : ""}` +
        `${(r.pplChange * 100).toFixed(2)} | ${(r.top1 * 100).toFixed(1)}% | ` +
        m.results.slice(1).map((x) => x.kl.toFixed(4)).join(" | ") + " |",
    );
  }
  return lines.join("\n");
}

/**
 * Per-layer sensitivity: mean KL when only layer l's keys are coded (at `bits`, with `scheme`),
 * every other layer's keys and all values exact.
 */
export async function layerSensitivity(
  model: LlamaModel,
  tokens: readonly number[],
  scheme: KeyScheme,
  bits: number,
  seeds: number,
): Promise<number[]> {
  const reference = await teacherForced(model, tokens, cpuBackendFactory);
  const L = model.config.numLayers;
  const out: number[] = [];
  for (let l = 0; l < L; l++) {
    const perLayer = Array.from({ length: L }, (_, i) => (i === l ? bits : 0));
    const r = await measure(model, tokens, reference, schemeFactory(scheme, perLayer, 0), seeds);
    out.push(r.kl);
  }
  return out;
}

/** |KL difference| between ResearchBackend and SimulatedCodecBackend on the default scheme. */
export async function sanityCheck(model: LlamaModel, tokens: readonly number[]): Promise<number> {
  const c = model.config;
  const ref = await teacherForced(model, tokens, cpuBackendFactory);
  const kc = new TurboQuantCodec({ headDim: c.headDim, bits: 4 });
  const vc = new TurboQuantCodec({ headDim: c.headDim, bits: 4 });
  const sim = await teacherForced(model, tokens, (cfg) =>
    new SimulatedCodecBackend({
      numLayers: cfg.numLayers,
      numKvHeads: cfg.numKvHeads,
      headDim: cfg.headDim,
      keyCentering: true,
    }, codecRoundTrip(kc, vc)));
  const mine = await teacherForced(model, tokens, schemeFactory(DEFAULT_SCHEME, 4)(0));
  return Math.abs(compareRuns(ref, sim).meanKl - compareRuns(ref, mine).meanKl);
}

async function main(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      model: { type: "string" },
      text: { type: "string" },
      seeds: { type: "string", default: "4" },
      bits: { type: "string", default: "4,5,6" },
      quick: { type: "boolean", default: false },
    },
  });
  const model = await loadModel(values.model ?? DEFAULT_MODEL_URL);
  const tokenizer = new Tokenizer(model.vocab);
  const textPath = values.text ?? new URL("./story.txt", import.meta.url);
  const tokens = tokenizer.encode(await Deno.readTextFile(textPath)).slice(0, model.config.seqLen);
  const seeds = Number(values.seeds);
  const bitsList = values.bits.split(",").map(Number);
  const diff = await sanityCheck(model, tokens);
  console.error(
    `sanity: |KL(SimulatedCodecBackend) - KL(ResearchBackend)| = ${diff.toExponential(2)}`,
  );
  const schemes = values.quick ? SCHEMES.filter((s) => HEADLINE_SCHEMES.includes(s.name)) : SCHEMES;
  const ms = await runSchemes(model, tokens, schemes, bitsList, seeds);
  console.log(`## Key schemes, ${tokens.length} tokens of story.txt, values TurboQuant 4 bits\n`);
  console.log(formatMeasurements(ms, seeds));
  const reference = await teacherForced(model, tokens, cpuBackendFactory);
  const decode: TeacherForcedOptions = { mode: "decode" };

  console.log("\n## Decode: tokens kept exact before the statistics are learnt (warm-up)\n");
  const warmups = [1, 8, 16, 32, 64, 128];
  console.log(`| key scheme | K bits | ${warmups.map((w) => `warm-up ${w}`).join(" | ")} |`);
  console.log("| --- | ---: |" + " ---: |".repeat(warmups.length));
  for (const s of [DEFAULT_SCHEME, RECOMMENDED_SCHEME]) {
    const kls = [];
    for (const w of warmups) {
      kls.push(
        (await measure(model, tokens, reference, schemeFactory(s, 4, 4, w), seeds, decode)).kl,
      );
    }
    console.log(`| ${s.name} | 4 | ${kls.map((x) => x.toFixed(4)).join(" | ")} |`);
    console.error(`warm-up sweep ${s.name} done`);
  }

  console.log("\n## The grid's bit pairs, prefill, current centring vs pre-RoPE centring\n");
  console.log(
    "| K/V bits | KL centred | ppl % centred | top-1 centred | KL pre-RoPE | ppl % pre-RoPE | " +
      "top-1 pre-RoPE |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  );
  for (const [kb, vb] of GRID_BITS) {
    const a = await measure(model, tokens, reference, schemeFactory(DEFAULT_SCHEME, kb, vb), seeds);
    const b = await measure(
      model,
      tokens,
      reference,
      schemeFactory(RECOMMENDED_SCHEME, kb, vb),
      seeds,
    );
    const cell = (r: typeof a) =>
      `${r.kl.toFixed(4)} | ${(r.pplChange * 100).toFixed(2)} | ${(r.top1 * 100).toFixed(1)}%`;
    console.log(`| K${kb}/V${vb} | ${cell(a)} | ${cell(b)} |`);
    console.error(`grid K${kb}/V${vb} done`);
  }

  // A second text the choices were not made on: the model's own sampled continuation.
  const decoder = new LlamaDecoder(model, cpuBackendFactory(model.config) as CpuAttentionBackend);
  const sampled = await generate(decoder, tokenizer.encode("Once upon a time"), {
    steps: model.config.seqLen,
    temperature: 1,
    seed: 7,
    stopAtBoundary: false,
  });
  const held = sampled.tokens.slice(0, Math.min(sampled.tokens.length, 480));
  const heldRef = await teacherForced(model, held, cpuBackendFactory);
  console.log(
    `\n## Held-out text: ${held.length} tokens sampled from the model (temperature 1, seed 7)\n`,
  );
  const heldSchemes = [
    DEFAULT_SCHEME,
    "q4_0 (block 8), centred",
    "q4_0 (block 8), pre-RoPE centred",
    RECOMMENDED_SCHEME,
    "TQ, pre-RoPE + query-aware per channel",
  ].map((s) => typeof s === "string" ? SCHEMES.find((x) => x.name === s)! : s);
  console.log(
    `| key scheme | ${
      bitsList.map((b) => `KL K${b}/V4 prefill | KL K${b}/V4 decode`).join(" | ")
    } |`,
  );
  console.log("| --- |" + " ---: | ---: |".repeat(bitsList.length));
  for (const s of heldSchemes) {
    const cells = [];
    for (const b of bitsList) {
      if (s.codes.kind === "q4_0" && b !== 4) {
        cells.push("-", "-");
        continue;
      }
      cells.push(
        (await measure(model, held, heldRef, schemeFactory(s, b, 4, 0), seeds)).kl.toFixed(4),
      );
      cells.push(
        (await measure(model, held, heldRef, schemeFactory(s, b, 4, 32), seeds, decode)).kl.toFixed(
          4,
        ),
      );
    }
    console.log(`| ${s.name} | ${cells.join(" | ")} |`);
    console.error(`held-out ${s.name} done`);
  }

  const L = model.config.numLayers;
  console.log("\n## Mixed key bits per layer (prefill; V 4 bits)\n");
  const mixes = [[4, 4, 4, 4, 4], [4, 5, 4, 5, 4], [4, 6, 4, 6, 4], [5, 5, 5, 5, 5]]
    .filter((m) => m.length === L);
  console.log(
    `| key scheme | ${mixes.map((m) => `K ${m.join("/")}`).join(" | ")} |\n| --- |` +
      " ---: |".repeat(mixes.length),
  );
  for (const s of [DEFAULT_SCHEME, RECOMMENDED_SCHEME]) {
    const kls = [];
    for (const m of mixes) {
      kls.push((await measure(model, tokens, reference, schemeFactory(s, m), seeds)).kl);
    }
    console.log(`| ${s.name} | ${kls.map((x) => x.toFixed(4)).join(" | ")} |`);
  }

  console.log(
    "\n## Per-layer sensitivity (only that layer's keys coded at 4 bits, the rest exact)\n",
  );
  console.log("| key scheme | " + Array.from({ length: L }, (_, l) => `L${l}`).join(" | ") + " |");
  console.log("| --- |" + " ---: |".repeat(L));
  for (const s of [DEFAULT_SCHEME, RECOMMENDED_SCHEME]) {
    const sens = await layerSensitivity(model, tokens, s, 4, seeds);
    console.log(`| ${s.name} | ${sens.map((x) => x.toFixed(4)).join(" | ")} |`);
  }
}

if (import.meta.main) await main(Deno.args);
