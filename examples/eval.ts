/**
 * The KV-cache evaluation grid on stories260k (or any llama2.c model): prints a markdown table
 * of perplexity, mean KL against exact f32 attention and top-1 agreement for exact attention,
 * TurboQuant at K/V bits 8/8, 8/4, 6/4, 5/4, 4/4, 4/3, 3/3, 8/3 (with and without key
 * centring), and q4_0 on centred keys. Progress goes to stderr, the table to stdout.
 *
 *   deno run -A examples/eval.ts [--model path] [--text file] [--mode prefill|decode]
 *     [--chunk-size N] [--cache gpu|simulated] [--json]
 *
 * `--cache gpu` (default) holds every layer's K/V in the library's `TurboQuantKVCache`;
 * `--cache simulated` round-trips them through the CPU codec instead (same codes, faster here).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { requestTurboQuantDevice, TurboQuantKVCache } from "../mod.ts";
import type { AttentionBackend } from "./llama2c/attention_backend.ts";
import {
  type CacheFactory,
  type CacheSpec,
  formatGrid,
  runGrid,
  simulatedTurboQuant,
} from "./llama2c/eval_grid.ts";
import { DEFAULT_MODEL_URL, type LlamaConfig, loadModel } from "./llama2c/model.ts";
import { Tokenizer } from "./llama2c/tokenizer.ts";

/** The GPU TurboQuant cache as a {@linkcode CacheFactory}. */
export async function gpuTurboQuant(): Promise<CacheFactory> {
  const device = await requestTurboQuantDevice();
  return (spec: CacheSpec) => (config: LlamaConfig): AttentionBackend =>
    new TurboQuantKVCache(device, {
      numLayers: config.numLayers,
      numKvHeads: config.numKvHeads,
      headDim: config.headDim,
      initialCapacity: config.seqLen,
      keyBits: spec.keyBits,
      valueBits: spec.valueBits,
      keyCentering: spec.keyCentering,
    });
}

async function main(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      model: { type: "string" },
      text: { type: "string" },
      mode: { type: "string", default: "prefill" },
      "chunk-size": { type: "string" },
      cache: { type: "string", default: "gpu" },
      json: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    console.log(
      "usage: deno run -A examples/eval.ts [--model path] [--text file] " +
        "[--mode prefill|decode] [--chunk-size N] [--cache gpu|simulated] [--json]",
    );
    return;
  }
  if (values.mode !== "prefill" && values.mode !== "decode") {
    throw new Error(`--mode must be prefill or decode, got ${values.mode}`);
  }
  if (values.cache !== "simulated" && values.cache !== "gpu") {
    throw new Error(`--cache must be simulated or gpu, got ${values.cache}`);
  }
  const chunkSize = values["chunk-size"] === undefined ? undefined : Number(values["chunk-size"]);
  const model = await loadModel(values.model ?? DEFAULT_MODEL_URL);
  const tokenizer = new Tokenizer(model.vocab);
  const textPath = values.text ?? new URL("./llama2c/story.txt", import.meta.url);
  const tokens = tokenizer.encode(await Deno.readTextFile(textPath)).slice(0, model.config.seqLen);
  const c = model.config;
  console.error(
    `model: ${c.numLayers} layers, ${c.numHeads} heads (${c.numKvHeads} KV), head_dim ` +
      `${c.headDim}; ${tokens.length} tokens, ${values.mode}${
        chunkSize ? ` chunks of ${chunkSize}` : ""
      }; ` +
      `cache ${values.cache}`,
  );
  const cacheFactory = values.cache === "gpu" ? await gpuTurboQuant() : simulatedTurboQuant();
  const results = await runGrid(model, tokens, { mode: values.mode, chunkSize, cacheFactory });
  if (values.json) {
    console.log(JSON.stringify(
      results.map((r) => ({
        config: r.row.name,
        keyBitsPerValue: r.keyBitsPerValue,
        valueBitsPerValue: r.valueBitsPerValue,
        ...r.comparison,
      })),
      null,
      2,
    ));
    return;
  }
  console.log(
    `Teacher-forced over ${tokens.length} tokens (${values.mode}); KL and top-1 against exact f32 ` +
      `attention; bits per value include one f16 scale per block of ${Math.min(32, c.headDim)}.\n`,
  );
  console.log(formatGrid(results));
}

if (import.meta.main) await main(Deno.args);
