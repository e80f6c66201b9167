/**
 * Runs one K/V storage format over the captured paragraphs of the real encoder and measures it:
 * K and V error, each layer's attention output against the model's own, and (optionally) the
 * final sentence embeddings with the format in every layer and their neighbour rankings.
 *
 * @module
 */

import type { Capture, Encoder } from "../encoder/use_lite.ts";
import { attendWithCodec, quantizeKV } from "./attend.ts";
import {
  compareRankings,
  cosine,
  ErrorAccumulator,
  headCosines,
  meanPerHead,
  type RankingChange,
  shiftPerHead,
  summarize,
  type Summary,
} from "./metrics.ts";
import type { KVMethod } from "./quantizers.ts";

/** A paragraph and the encoder's exact run on it. */
export interface ParagraphRun {
  /** The text. */
  text: string;
  /** Q, K, V, outputs and embedding of the exact run. */
  capture: Capture;
}

/** Everything measured for one method. */
export interface MethodResult {
  /** The method. */
  method: KVMethod;
  /** sum ||k - k~||^2 / sum ||k||^2 over layers, paragraphs, heads and tokens (raw keys). */
  keyNmse: number;
  /** The same for V. */
  valueNmse: number;
  /** Per layer: cosine of each head's attention output with the model's own (over paragraphs). */
  attentionCosine: Summary[];
  /** 1 - the mean of all attention cosines (layers, paragraphs, heads): the plotted error. */
  attentionError: number;
  /** Cosine of each paragraph's embedding with the exact one (when embeddings were run). */
  embeddingCosine?: Summary;
  /** Neighbour rankings of the embeddings against the exact ones (when embeddings were run). */
  ranking?: RankingChange;
}

/** Options of {@linkcode evaluateMethod}. */
export interface EvaluateOptions {
  /** Centre keys before encoding (see {@linkcode quantizeKV}). */
  centreKeys: boolean;
  /** Also rerun the model with the format in every layer and compare embeddings. */
  embeddings: boolean;
  /** GPU device: TurboQuant attention then runs in the library's GPU cache. */
  device?: GPUDevice | null;
}

/** Measures `method` on every paragraph. */
export async function evaluateMethod(
  encoder: Encoder,
  method: KVMethod,
  runs: readonly ParagraphRun[],
  options: EvaluateOptions,
): Promise<MethodResult> {
  const attend = attendWithCodec(method, options.centreKeys, options.device);
  const kErr = new ErrorAccumulator();
  const vErr = new ErrorAccumulator();
  const layerCos: number[][] = runs[0].capture.layers.map(() => []);
  for (const { capture } of runs) {
    for (const L of capture.layers) {
      const kv = quantizeKV(method, L, L.k, L.v, options.centreKeys);
      kErr.add(L.k, kv.k);
      vErr.add(L.v, kv.v);
      const out = await attend(L, L.q, L.k, L.v);
      layerCos[L.layer].push(...headCosines(L.output, out, L.numHeads));
    }
  }
  const all = layerCos.flat();
  const result: MethodResult = {
    method,
    keyNmse: kErr.value,
    valueNmse: vErr.value,
    attentionCosine: layerCos.map(summarize),
    attentionError: 1 - all.reduce((s, c) => s + c, 0) / all.length,
  };
  if (options.embeddings) {
    const embeddings: Float32Array[] = [];
    for (const { text } of runs) embeddings.push(await encoder.embedWithAttention(text, attend));
    const exact = runs.map((r) => r.capture.embedding);
    result.embeddingCosine = summarize(embeddings.map((e, i) => cosine(exact[i], e)));
    result.ranking = compareRankings(exact, embeddings);
  }
  return result;
}

/**
 * Cosine of the embedding computed by feeding round-tripped K/V to the model's own attention
 * (`embedWithQuantizedKV`) with the one computed through {@linkcode attendWithCodec}
 * (`embedWithAttention`), per paragraph: shows that the two routes agree.
 */
export async function crossCheckRoutes(
  encoder: Encoder,
  method: KVMethod,
  runs: readonly ParagraphRun[],
  centreKeys: boolean,
  device?: GPUDevice | null,
): Promise<Summary> {
  const attend = attendWithCodec(method, centreKeys, device);
  const cos: number[] = [];
  for (const { text } of runs) {
    const viaModel = await encoder.embedWithQuantizedKV(
      text,
      (info, k, v) => quantizeKV(method, info, k, v, centreKeys),
    );
    cos.push(cosine(viaModel, await encoder.embedWithAttention(text, attend)));
  }
  return summarize(cos);
}

/** Share of the keys' energy in their per-paragraph mean, per layer: 1 - sum||k-mu||^2/sum||k||^2. */
export function keyMeanShare(runs: readonly ParagraphRun[]): number[] {
  return runs[0].capture.layers.map((_, l) => {
    let total = 0, centred = 0;
    for (const { capture } of runs) {
      const L = capture.layers[l];
      const c = shiftPerHead(L.k, meanPerHead(L.k, L.numHeads, L.headDim), L.numHeads, -1);
      for (let i = 0; i < L.k.length; i++) {
        total += L.k[i] ** 2;
        centred += c[i] ** 2;
      }
    }
    return 1 - centred / total;
  });
}
