/**
 * The demo's last part: greedy generation with the small pretrained llama2.c model, once with
 * exact attention and once with K/V round-tripped through the TurboQuant codec (keys centred on
 * the prompt's mean key, as the GPU cache does), so the two continuations can be compared.
 *
 * @module
 */

import { TurboQuantCodec, TurboQuantKVCache } from "../../mod.ts";
import {
  type AttentionBackend,
  CpuAttentionBackend,
  SimulatedCodecBackend,
} from "../llama2c/attention_backend.ts";
import { LlamaDecoder } from "../llama2c/forward.ts";
import { generate } from "../llama2c/generate.ts";
import { DEFAULT_MODEL_URL, type LlamaModel, loadModel } from "../llama2c/model.ts";
import { Tokenizer } from "../llama2c/tokenizer.ts";

/** Where the model is looked for: `../shared/models/stories260k.bin` from the repo root. */
export const MODEL_URL: URL = DEFAULT_MODEL_URL;

/** Settings of the generation comparison. */
export interface GenerationOptions {
  /** Prompt text (BOS is prepended). */
  prompt: string;
  /** New tokens at most. */
  steps: number;
  /** TurboQuant bits of the keys (head_dim 8 needs many). */
  keyBits: number;
  /** TurboQuant bits of the values. */
  valueBits: number;
}

/** One continuation. */
export interface Continuation {
  /** Label, e.g. "exact f32". */
  label: string;
  /** Prompt plus continuation, decoded. */
  text: string;
  /** All token ids (prompt first). */
  tokens: number[];
  /** Decode speed, tokens per second. */
  tokensPerSecond: number;
}

/** The two continuations and where they first differ. */
export interface GenerationComparison {
  /** Exact attention, then the codec-simulating backend. */
  runs: [Continuation, Continuation];
  /** Stored bits per value of the keys and of the values. */
  bitsPerValue: { key: number; value: number };
  /** Index of the first differing new token, or null when identical. */
  firstDifference: number | null;
  /** Number of prompt tokens. */
  promptTokens: number;
}

/** Whether the model file is there. */
export async function modelAvailable(url: URL = MODEL_URL): Promise<boolean> {
  try {
    return (await Deno.stat(url)).isFile;
  } catch {
    return false;
  }
}

async function continueWith(
  label: string,
  model: LlamaModel,
  backend: AttentionBackend,
  prompt: number[],
  steps: number,
  tokenizer: Tokenizer,
): Promise<Continuation> {
  const r = await generate(new LlamaDecoder(model, backend), prompt, { steps });
  return {
    label,
    text: tokenizer.decode(r.tokens),
    tokens: r.tokens,
    tokensPerSecond: r.decodeTokensPerSecond,
  };
}

/** Runs both generations. */
export async function compareGenerations(
  options: GenerationOptions,
  url: URL = MODEL_URL,
  device: GPUDevice | null = null,
): Promise<GenerationComparison> {
  const model = await loadModel(url);
  const tokenizer = new Tokenizer(model.vocab);
  const c = model.config;
  const shape = {
    numLayers: c.numLayers,
    numKvHeads: c.numKvHeads,
    headDim: c.headDim,
    initialCapacity: c.seqLen,
  };
  const keyCodec = new TurboQuantCodec({ headDim: c.headDim, bits: options.keyBits });
  const valueCodec = new TurboQuantCodec({ headDim: c.headDim, bits: options.valueBits });
  // With a device the K/V live in the library's GPU cache; else the CPU codec (same codes).
  const quantizedBackend: AttentionBackend & { destroy?(): void } = device
    ? new TurboQuantKVCache(device, {
      ...shape,
      keyBits: options.keyBits,
      valueBits: options.valueBits,
    })
    : new SimulatedCodecBackend(
      { ...shape, keyCentering: true },
      (x, kind) => {
        const codec = kind === "k" ? keyCodec : valueCodec;
        return codec.decode(codec.encode(x));
      },
    );
  const prompt = tokenizer.encode(options.prompt);
  const exact = await continueWith(
    "exact f32",
    model,
    new CpuAttentionBackend(shape),
    prompt,
    options.steps,
    tokenizer,
  );
  const quantized = await continueWith(
    `TurboQuant K${options.keyBits}/V${options.valueBits}${device ? ", GPU cache" : ""}`,
    model,
    quantizedBackend,
    prompt,
    options.steps,
    tokenizer,
  );
  quantizedBackend.destroy?.();
  const n = Math.max(exact.tokens.length, quantized.tokens.length);
  let first: number | null = null;
  for (let i = prompt.length; i < n; i++) {
    if (exact.tokens[i] !== quantized.tokens[i]) {
      first = i - prompt.length;
      break;
    }
  }
  return {
    runs: [exact, quantized],
    bitsPerValue: { key: keyCodec.bitsPerValue, value: valueCodec.bitsPerValue },
    firstDifference: first,
    promptTokens: prompt.length,
  };
}
