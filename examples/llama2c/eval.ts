/**
 * Evaluation of attention backends on a llama2.c model: teacher-forced perplexity, the
 * next-token distribution at every position, and, against a reference run, mean
 * KL(p_ref || p) and top-1 agreement.
 *
 * @module
 */

import { type AttentionBackend, CpuAttentionBackend } from "./attention_backend.ts";
import { argmax, LlamaDecoder } from "./forward.ts";
import type { LlamaConfig, LlamaModel } from "./model.ts";

/** Makes a fresh, empty backend sized for a model. */
export type BackendFactory = (config: LlamaConfig) => AttentionBackend | Promise<AttentionBackend>;

/** The exact f32 CPU reference backend. */
export const cpuBackendFactory: BackendFactory = (config: LlamaConfig): AttentionBackend =>
  new CpuAttentionBackend({
    numLayers: config.numLayers,
    numKvHeads: config.numKvHeads,
    headDim: config.headDim,
    initialCapacity: Math.min(config.seqLen, 512),
  });

/** How a text is fed to the decoder. */
export interface TeacherForcedOptions {
  /**
   * "prefill": chunks of `chunkSize` tokens, each one append + one causal attention per layer;
   * "decode": one token per forward call (qTokens = 1). Default "prefill".
   */
  mode?: "prefill" | "decode";
  /** Prefill chunk length; default the whole text in one chunk. */
  chunkSize?: number;
}

/** Result of one teacher-forced run over `tokens`. */
export interface TeacherForcedResult {
  /** The tokens fed (tokens[0] is usually BOS). */
  tokens: number[];
  /** Vocabulary size (row length of logProbs). */
  vocabSize: number;
  /** Log-probabilities of the next token after each of positions 0..n-2: [(n - 1), vocab]. */
  logProbs: Float32Array;
  /** -log p(tokens[t + 1]) for t = 0..n-2. */
  nll: Float64Array;
  /** exp(mean nll). */
  perplexity: number;
  /** Wall time of the forward calls, seconds. */
  seconds: number;
  /** Tokens processed per second. */
  tokensPerSecond: number;
}

/** Log-softmax of one row of logits. */
export function logSoftmax(row: ArrayLike<number>): Float32Array {
  let max = -Infinity;
  for (let i = 0; i < row.length; i++) if (row[i] > max) max = row[i];
  let sum = 0;
  for (let i = 0; i < row.length; i++) sum += Math.exp(row[i] - max);
  const lse = max + Math.log(sum);
  const out = new Float32Array(row.length);
  for (let i = 0; i < row.length; i++) out[i] = row[i] - lse;
  return out;
}

/** Destroys a backend when it owns GPU resources (the library's caches have destroy()). */
function release(backend: AttentionBackend): void {
  const b = backend as AttentionBackend & { destroy?: () => void };
  if (typeof b.destroy === "function") b.destroy();
}

/**
 * Feeds `tokens` through a fresh backend from `factory` and records the next-token
 * distribution at every position.
 */
export async function teacherForced(
  model: LlamaModel,
  tokens: readonly number[],
  factory: BackendFactory = cpuBackendFactory,
  options: TeacherForcedOptions = {},
): Promise<TeacherForcedResult> {
  const n = tokens.length;
  if (n < 2) throw new RangeError("teacher forcing needs at least two tokens");
  const V = model.config.vocabSize;
  const mode = options.mode ?? "prefill";
  const chunk = mode === "decode" ? 1 : options.chunkSize ?? n;
  if (!Number.isInteger(chunk) || chunk <= 0) {
    throw new RangeError(`chunkSize must be a positive integer, got ${chunk}`);
  }
  const backend = await factory(model.config);
  const decoder = new LlamaDecoder(model, backend);
  const logProbs = new Float32Array((n - 1) * V);
  const nll = new Float64Array(n - 1);
  const start = performance.now();
  try {
    // The last token predicts nothing we can score, so it is not fed.
    for (let s = 0; s < n - 1; s += chunk) {
      const part = tokens.slice(s, Math.min(s + chunk, n - 1));
      const logits = await decoder.forward(part, { logits: "all" });
      for (let t = 0; t < part.length; t++) {
        const lp = logSoftmax(logits.subarray(t * V, (t + 1) * V));
        logProbs.set(lp, (s + t) * V);
        nll[s + t] = -lp[tokens[s + t + 1]];
      }
    }
  } finally {
    release(backend);
  }
  const seconds = (performance.now() - start) / 1000;
  const mean = nll.reduce((a, b) => a + b, 0) / nll.length;
  return {
    tokens: [...tokens],
    vocabSize: V,
    logProbs,
    nll,
    perplexity: Math.exp(mean),
    seconds,
    tokensPerSecond: (n - 1) / seconds,
  };
}

/** How a candidate run's distributions differ from a reference run's. */
export interface Comparison {
  /** Mean over positions of KL(p_ref || p), nats. */
  meanKl: number;
  /** Largest per-position KL, nats. */
  maxKl: number;
  /** Fraction of positions whose most likely next token is the same. */
  top1Agreement: number;
  /** Reference perplexity. */
  referencePerplexity: number;
  /** Candidate perplexity. */
  perplexity: number;
  /** perplexity / referencePerplexity - 1. */
  perplexityChange: number;
}

/** Compares two runs over the same tokens. */
export function compareRuns(
  reference: TeacherForcedResult,
  candidate: TeacherForcedResult,
): Comparison {
  const V = reference.vocabSize;
  const rows = reference.nll.length;
  if (candidate.vocabSize !== V || candidate.nll.length !== rows) {
    throw new RangeError("runs cover different tokens or vocabularies");
  }
  let sumKl = 0;
  let maxKl = 0;
  let agree = 0;
  for (let t = 0; t < rows; t++) {
    const p = reference.logProbs.subarray(t * V, (t + 1) * V);
    const q = candidate.logProbs.subarray(t * V, (t + 1) * V);
    let kl = 0;
    for (let i = 0; i < V; i++) {
      const pi = Math.exp(p[i]);
      if (pi > 0) kl += pi * (p[i] - q[i]);
    }
    kl = Math.max(kl, 0); // rounding can push a near-zero KL below 0
    sumKl += kl;
    if (kl > maxKl) maxKl = kl;
    if (argmax(p) === argmax(q)) agree++;
  }
  return {
    meanKl: sumKl / rows,
    maxKl,
    top1Agreement: agree / rows,
    referencePerplexity: reference.perplexity,
    perplexity: candidate.perplexity,
    perplexityChange: candidate.perplexity / reference.perplexity - 1,
  };
}

/** Result of {@linkcode evaluateBackend}. */
export interface Evaluation {
  /** Reference run (exact CPU attention unless given). */
  reference: TeacherForcedResult;
  /** Candidate run. */
  candidate: TeacherForcedResult;
  /** Candidate against reference. */
  comparison: Comparison;
}

/**
 * Runs the reference (default: exact CPU attention in prefill) and the candidate backend over
 * the same tokens and compares them. Pass a previous reference run to avoid recomputing it.
 */
export async function evaluateBackend(
  model: LlamaModel,
  tokens: readonly number[],
  candidate: BackendFactory,
  options: TeacherForcedOptions & { reference?: TeacherForcedResult } = {},
): Promise<Evaluation> {
  const reference = options.reference ??
    await teacherForced(model, tokens, cpuBackendFactory, { mode: "prefill" });
  const run = await teacherForced(model, tokens, candidate, options);
  return { reference, candidate: run, comparison: compareRuns(reference, run) };
}
