/**
 * llama2.c-family decoder (matmuls on the CPU) whose K/V live in the library's GPU cache.
 *
 * Generate:  deno run -A examples/llama2c.ts --prompt "Once upon a time" --steps 64
 * Evaluate:  deno run -A examples/llama2c.ts --eval [--text file] [--mode prefill|decode]
 *            (teacher-forced perplexity, and KL / top-1 agreement against exact CPU attention)
 *
 * Options: --model path (v1 or legacy .bin; default ../shared/models/stories260k.bin),
 * --tokenizer path (legacy only; default tokenizer.bin beside the model), --temperature 0,
 * --seed 42, --key-bits 8, --value-bits 4 (head_dim 8 needs more key bits than large heads),
 * --cache turboquant|f32|cpu (default turboquant: every layer's K/V in a TurboQuantKVCache).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { requestTurboQuantDevice, TurboQuantKVCache, UncompressedKVCache } from "../mod.ts";
import type { AttentionBackend } from "./llama2c/attention_backend.ts";
import { type BackendFactory, cpuBackendFactory, evaluateBackend } from "./llama2c/eval.ts";
import { LlamaDecoder } from "./llama2c/forward.ts";
import { generate } from "./llama2c/generate.ts";
import { DEFAULT_MODEL_URL, type LlamaConfig, loadModel } from "./llama2c/model.ts";
import { Tokenizer } from "./llama2c/tokenizer.ts";

/** Which attention backend to run. */
export type CacheKind = "cpu" | "f32" | "turboquant";

/** Settings of the GPU caches. */
export interface CacheSettings {
  /** Key bits of the TurboQuant cache. */
  keyBits: number;
  /** Value bits of the TurboQuant cache. */
  valueBits: number;
}

/**
 * Backend factory for a cache kind: `cpu` is the exact CPU reference; `f32` and `turboquant`
 * are the library's GPU caches (UncompressedKVCache and TurboQuantKVCache), one per model,
 * holding every layer's K/V and computing every attention.
 */
export async function backendFactory(
  kind: CacheKind,
  settings: CacheSettings,
): Promise<BackendFactory> {
  if (kind === "cpu") return cpuBackendFactory;
  const device = await requestTurboQuantDevice();
  return (config: LlamaConfig): AttentionBackend => {
    const shape = {
      numLayers: config.numLayers,
      numKvHeads: config.numKvHeads,
      headDim: config.headDim,
      initialCapacity: config.seqLen,
    };
    return kind === "f32"
      ? new UncompressedKVCache(device, { ...shape, dtype: "f32" })
      : new TurboQuantKVCache(device, {
        ...shape,
        keyBits: settings.keyBits,
        valueBits: settings.valueBits,
      });
  };
}

function numArg(value: string | undefined, name: string, fallback: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isFinite(n)) throw new Error(`--${name} must be a number, got ${value}`);
  return n;
}

async function main(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      model: { type: "string" },
      tokenizer: { type: "string" },
      prompt: { type: "string", default: "Once upon a time" },
      steps: { type: "string" },
      temperature: { type: "string" },
      seed: { type: "string" },
      "key-bits": { type: "string" },
      "value-bits": { type: "string" },
      cache: { type: "string", default: "turboquant" },
      eval: { type: "boolean", default: false },
      text: { type: "string" },
      mode: { type: "string", default: "prefill" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    console.log(
      "usage: deno run -A examples/llama2c.ts [--model path] [--tokenizer path] [--prompt text]\n" +
        "  [--steps N] [--temperature 0] [--seed 42] [--key-bits 8] [--value-bits 4]\n" +
        "  [--cache cpu|f32|turboquant] [--eval [--text file] [--mode prefill|decode]]",
    );
    return;
  }
  const cache = values.cache as CacheKind;
  if (!["cpu", "f32", "turboquant"].includes(cache)) {
    throw new Error(`--cache must be cpu, f32 or turboquant, got ${values.cache}`);
  }
  const settings: CacheSettings = {
    keyBits: numArg(values["key-bits"], "key-bits", 8),
    valueBits: numArg(values["value-bits"], "value-bits", 4),
  };
  const model = await loadModel(values.model ?? DEFAULT_MODEL_URL, values.tokenizer);
  const tokenizer = new Tokenizer(model.vocab);
  const c = model.config;
  console.error(
    `model: ${model.format}, dim ${c.dim}, ${c.numLayers} layers, ${c.numHeads} heads ` +
      `(${c.numKvHeads} KV), head_dim ${c.headDim}, vocab ${c.vocabSize}, cache ${cache}`,
  );
  const factory = await backendFactory(cache, settings);

  if (values.eval) {
    const textPath = values.text ?? new URL("./llama2c/story.txt", import.meta.url);
    const tokens = tokenizer.encode(await Deno.readTextFile(textPath)).slice(0, c.seqLen);
    const mode = values.mode === "decode" ? "decode" : "prefill";
    const { reference, candidate, comparison } = await evaluateBackend(model, tokens, factory, {
      mode,
    });
    console.log(`tokens: ${tokens.length} (${mode})`);
    console.log(`reference (cpu f32) perplexity: ${reference.perplexity.toFixed(4)}`);
    console.log(
      `${cache} perplexity: ${candidate.perplexity.toFixed(4)} ` +
        `(${(comparison.perplexityChange * 100).toFixed(2)}%), ` +
        `${candidate.tokensPerSecond.toFixed(0)} tokens/s`,
    );
    console.log(
      `mean KL(ref || ${cache}): ${comparison.meanKl.toExponential(3)} nats, ` +
        `max ${comparison.maxKl.toExponential(3)}, top-1 agreement ` +
        `${(comparison.top1Agreement * 100).toFixed(1)}%`,
    );
    return;
  }

  const decoder = new LlamaDecoder(model, await factory(c));
  const prompt = tokenizer.encode(values.prompt ?? "");
  const encoder = new TextEncoder();
  const stream = new TextDecoder();
  let prev = prompt[prompt.length - 1];
  await Deno.stdout.write(encoder.encode(tokenizer.decode(prompt)));
  const result = await generate(decoder, prompt, {
    steps: numArg(values.steps, "steps", 256),
    temperature: numArg(values.temperature, "temperature", 0),
    seed: numArg(values.seed, "seed", 42),
    onToken: (id) => {
      // Byte-fallback tokens can split a UTF-8 character: decode as a stream.
      const text = stream.decode(tokenizer.pieceBytes(id, prev), { stream: true });
      prev = id;
      Deno.stdout.writeSync(encoder.encode(text));
    },
  });
  console.log(stream.decode());
  console.error(
    `prompt ${result.promptTokens} tokens in ${(result.prefillSeconds * 1000).toFixed(1)} ms, ` +
      `${result.newTokens} new tokens at ${result.decodeTokensPerSecond.toFixed(1)} tokens/s`,
  );
  (decoder.backend as { destroy?: () => void }).destroy?.();
}

if (import.meta.main) {
  try {
    await main(Deno.args);
  } catch (e) {
    console.error(`error: ${e instanceof Error ? e.message : e}`);
    Deno.exit(1);
  }
}
