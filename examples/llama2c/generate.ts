/**
 * Text generation with a {@linkcode LlamaDecoder}: one prefill of the prompt, then one token per
 * forward call, greedy or sampled.
 *
 * @module
 */

import { argmax, type LlamaDecoder } from "./forward.ts";
import { BOS_ID, EOS_ID } from "./tokenizer.ts";

/** Options of {@linkcode generate}. */
export interface GenerateOptions {
  /** Maximum number of new tokens (capped by the model context). */
  steps: number;
  /** 0 (default) is greedy; otherwise sample from softmax(logits / temperature). */
  temperature?: number;
  /** Seed of the sampler (default 42). */
  seed?: number;
  /** Stop when the model emits BOS or EOS (default true; llama2.c delimits stories with BOS). */
  stopAtBoundary?: boolean;
  /** Called with every new token as soon as it is chosen. */
  onToken?: (id: number) => void;
}

/** What {@linkcode generate} produced and how fast. */
export interface GenerateResult {
  /** Prompt tokens followed by the new ones. */
  tokens: number[];
  /** Number of prompt tokens. */
  promptTokens: number;
  /** Number of new tokens. */
  newTokens: number;
  /** Seconds spent in the prompt prefill. */
  prefillSeconds: number;
  /** Seconds spent decoding the new tokens. */
  decodeSeconds: number;
  /** Decode speed (new tokens per second, excluding the prefill). */
  decodeTokensPerSecond: number;
}

/** Small deterministic PRNG (mulberry32), uniform in [0, 1). */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Picks the next token from logits. */
export function sample(logits: Float32Array, temperature: number, random: () => number): number {
  if (temperature <= 0) return argmax(logits);
  let max = -Infinity;
  for (const z of logits) if (z > max) max = z;
  const p = new Float64Array(logits.length);
  let sum = 0;
  for (let i = 0; i < logits.length; i++) sum += p[i] = Math.exp((logits[i] - max) / temperature);
  let r = random() * sum;
  for (let i = 0; i < p.length; i++) {
    r -= p[i];
    if (r <= 0) return i;
  }
  return p.length - 1;
}

/**
 * Continues `prompt` (token ids, normally starting with BOS). The decoder must be at position 0
 * (call `decoder.reset()` first when reusing it).
 */
export async function generate(
  decoder: LlamaDecoder,
  prompt: readonly number[],
  options: GenerateOptions,
): Promise<GenerateResult> {
  if (prompt.length === 0) throw new RangeError("prompt must hold at least one token");
  const { temperature = 0, seed = 42, stopAtBoundary = true, onToken } = options;
  const random = mulberry32(seed);
  const steps = Math.min(
    options.steps,
    decoder.model.config.seqLen - decoder.position - prompt.length,
  );
  const tokens = [...prompt];
  let t0 = performance.now();
  let logits = await decoder.forward(prompt);
  const prefillSeconds = (performance.now() - t0) / 1000;
  t0 = performance.now();
  let produced = 0;
  for (let i = 0; i < steps; i++) {
    const next = sample(logits, temperature, random);
    if (stopAtBoundary && (next === BOS_ID || next === EOS_ID)) break;
    tokens.push(next);
    produced++;
    onToken?.(next);
    if (i + 1 < steps) logits = await decoder.forward([next]);
  }
  const decodeSeconds = (performance.now() - t0) / 1000;
  return {
    tokens,
    promptTokens: prompt.length,
    newTokens: produced,
    prefillSeconds,
    decodeSeconds,
    decodeTokensPerSecond: produced / Math.max(decodeSeconds, 1e-9),
  };
}
