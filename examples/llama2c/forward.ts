/**
 * CPU forward pass of a llama2.c model (plain TypeScript, Float32Array matmuls) whose attention
 * goes through an {@linkcode AttentionBackend}: per layer, the chunk's K and V are appended, then
 * one causal attention call covers the chunk's queries. Prefill (many tokens per call) and
 * decode (one token per call) go through the same code.
 *
 * @module
 */

import type { AttentionBackend } from "./attention_backend.ts";
import type { LlamaModel } from "./model.ts";

/** RMSNorm epsilon of llama2.c models. */
export const RMS_EPS = 1e-5;
/** RoPE base. */
export const ROPE_THETA = 10000;

/** Options of {@linkcode LlamaDecoder.forward}. */
export interface ForwardOptions {
  /** Which logits to return: every chunk position ("all") or only the last (default). */
  logits?: "all" | "last";
}

/**
 * y[t, o] = sum_i W[o, i] x[t, i] for every row t: x is [tokens, n], W is [m, n], y [tokens, m].
 * Four outputs per pass over x so each x element loaded is used four times.
 */
export function matmul(
  y: Float32Array,
  x: Float32Array,
  w: Float32Array,
  tokens: number,
  n: number,
  m: number,
): void {
  for (let t = 0; t < tokens; t++) {
    const xo = t * n;
    const yo = t * m;
    let o = 0;
    for (; o + 4 <= m; o += 4) {
      const w0 = o * n, w1 = w0 + n, w2 = w1 + n, w3 = w2 + n;
      let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (let i = 0; i < n; i++) {
        const xi = x[xo + i];
        s0 += w[w0 + i] * xi;
        s1 += w[w1 + i] * xi;
        s2 += w[w2 + i] * xi;
        s3 += w[w3 + i] * xi;
      }
      y[yo + o] = s0;
      y[yo + o + 1] = s1;
      y[yo + o + 2] = s2;
      y[yo + o + 3] = s3;
    }
    for (; o < m; o++) {
      const wo = o * n;
      let s = 0;
      for (let i = 0; i < n; i++) s += w[wo + i] * x[xo + i];
      y[yo + o] = s;
    }
  }
}

/** RMSNorm of every row of x ([tokens, n]) times gain g, into out. */
export function rmsNorm(
  out: Float32Array,
  x: Float32Array,
  g: Float32Array,
  tokens: number,
  n: number,
): void {
  for (let t = 0; t < tokens; t++) {
    const o = t * n;
    let ss = 0;
    for (let i = 0; i < n; i++) ss += x[o + i] * x[o + i];
    const inv = 1 / Math.sqrt(ss / n + RMS_EPS);
    for (let i = 0; i < n; i++) out[o + i] = g[i] * (x[o + i] * inv);
  }
}

/**
 * A llama2.c decoder bound to one attention backend. It tracks the position; the backend must
 * hold exactly the tokens this decoder appended (call {@linkcode LlamaDecoder.reset} to start
 * over: it resets the backend too).
 */
export class LlamaDecoder {
  /** The model it runs. */
  readonly model: LlamaModel;
  /** The attention (KV cache) backend. */
  readonly backend: AttentionBackend;
  #pos = 0;
  readonly #cos: Float32Array;
  readonly #sin: Float32Array;

  /**
   * Binds a model to a backend and precomputes the RoPE tables.
   * @param model A loaded model.
   * @param backend Attention backend sized for the model (numLayers, numKvHeads, headDim).
   */
  constructor(model: LlamaModel, backend: AttentionBackend) {
    this.model = model;
    this.backend = backend;
    // RoPE tables for every position of the context: pairs (2i, 2i+1) of each head rotate by
    // pos / theta^(2i / headDim).
    const { seqLen, headDim } = model.config;
    const half = headDim / 2;
    this.#cos = new Float32Array(seqLen * half);
    this.#sin = new Float32Array(seqLen * half);
    for (let p = 0; p < seqLen; p++) {
      for (let i = 0; i < half; i++) {
        const angle = p / Math.pow(ROPE_THETA, (2 * i) / headDim);
        this.#cos[p * half + i] = Math.cos(angle);
        this.#sin[p * half + i] = Math.sin(angle);
      }
    }
  }

  /** Number of tokens processed so far (the next token's position). */
  get position(): number {
    return this.#pos;
  }

  /** Starts a new sequence: position 0 and an empty backend. */
  async reset(): Promise<void> {
    await this.backend.reset();
    this.#pos = 0;
  }

  /** Rotates `heads` heads of each of `tokens` rows of x ([tokens, heads * headDim]). */
  #rope(x: Float32Array, tokens: number, heads: number): void {
    const d = this.model.config.headDim;
    const half = d / 2;
    for (let t = 0; t < tokens; t++) {
      const po = (this.#pos + t) * half;
      for (let h = 0; h < heads; h++) {
        const o = (t * heads + h) * d;
        for (let i = 0; i < half; i++) {
          const c = this.#cos[po + i];
          const s = this.#sin[po + i];
          const a = x[o + 2 * i];
          const b = x[o + 2 * i + 1];
          x[o + 2 * i] = a * c - b * s;
          x[o + 2 * i + 1] = a * s + b * c;
        }
      }
    }
  }

  /**
   * Runs a chunk of tokens (prefill when more than one) and returns logits: [tokens, vocab]
   * with `logits: "all"`, else [vocab] for the last token.
   */
  async forward(tokens: ArrayLike<number>, options: ForwardOptions = {}): Promise<Float32Array> {
    const c = this.model.config;
    const w = this.model.weights;
    const T = tokens.length;
    if (T === 0) throw new RangeError("forward needs at least one token");
    if (this.#pos + T > c.seqLen) {
      throw new RangeError(
        `positions ${this.#pos}..${this.#pos + T - 1} exceed the model context ${c.seqLen}`,
      );
    }
    const { dim, hiddenDim, kvDim, headDim: d, numHeads, numKvHeads } = c;
    const x = new Float32Array(T * dim);
    for (let t = 0; t < T; t++) {
      const id = tokens[t];
      if (!Number.isInteger(id) || id < 0 || id >= c.vocabSize) {
        throw new RangeError(`token id ${id} out of range 0..${c.vocabSize - 1}`);
      }
      x.set(w.tokenEmbedding.subarray(id * dim, (id + 1) * dim), t * dim);
    }
    const xb = new Float32Array(T * dim);
    const q = new Float32Array(T * dim);
    const k = new Float32Array(T * kvDim);
    const v = new Float32Array(T * kvDim);
    const qh = new Float32Array(T * dim);
    const kh = new Float32Array(T * kvDim);
    const vh = new Float32Array(T * kvDim);
    const att = new Float32Array(T * dim);
    const proj = new Float32Array(T * dim);
    const gate = new Float32Array(T * hiddenDim);
    const up = new Float32Array(T * hiddenDim);

    // [tokens, heads, d] <-> [heads, tokens, d], the backend's layout.
    const toHeadMajor = (src: Float32Array, dst: Float32Array, heads: number): void => {
      for (let t = 0; t < T; t++) {
        for (let h = 0; h < heads; h++) {
          const s = (t * heads + h) * d;
          dst.set(src.subarray(s, s + d), (h * T + t) * d);
        }
      }
    };

    for (let l = 0; l < c.numLayers; l++) {
      const lw = w.layers[l];
      rmsNorm(xb, x, lw.attnNorm, T, dim);
      matmul(q, xb, lw.wq, T, dim, dim);
      matmul(k, xb, lw.wk, T, dim, kvDim);
      matmul(v, xb, lw.wv, T, dim, kvDim);
      this.#rope(q, T, numHeads);
      this.#rope(k, T, numKvHeads);
      toHeadMajor(q, qh, numHeads);
      toHeadMajor(k, kh, numKvHeads);
      toHeadMajor(v, vh, numKvHeads);
      // Fresh copies: a backend may keep (or transfer) what it is given.
      await this.backend.append(l, kh.slice(), vh.slice());
      const out = await this.backend.attention(l, qh, {
        numHeads,
        scale: 1 / Math.sqrt(d),
        causal: true,
      });
      for (let h = 0; h < numHeads; h++) {
        for (let t = 0; t < T; t++) {
          const s = (h * T + t) * d;
          att.set(out.subarray(s, s + d), (t * numHeads + h) * d);
        }
      }
      matmul(proj, att, lw.wo, T, dim, dim);
      for (let i = 0; i < x.length; i++) x[i] += proj[i];

      rmsNorm(xb, x, lw.ffnNorm, T, dim);
      matmul(gate, xb, lw.wGate, T, dim, hiddenDim);
      matmul(up, xb, lw.wUp, T, dim, hiddenDim);
      for (let i = 0; i < gate.length; i++) {
        const g = gate[i];
        gate[i] = (g / (1 + Math.exp(-g))) * up[i]; // SwiGLU: silu(gate) * up
      }
      matmul(proj, gate, lw.wDown, T, hiddenDim, dim);
      for (let i = 0; i < x.length; i++) x[i] += proj[i];
    }
    this.#pos += T;

    const all = options.logits === "all";
    const rows = all ? T : 1;
    const last = all ? x : x.subarray((T - 1) * dim);
    const normed = new Float32Array(rows * dim);
    rmsNorm(normed, last, w.finalNorm, rows, dim);
    const logits = new Float32Array(rows * c.vocabSize);
    matmul(logits, normed, w.classifier, rows, dim, c.vocabSize);
    return logits;
  }
}

/** Index of the largest value in a row. */
export function argmax(row: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}
