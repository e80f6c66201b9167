/**
 * The attention step of the demo: one encoder layer's bidirectional attention with its K and V
 * stored in a given format. {@linkcode attendWithCodec} is the single place where the demo's
 * attention is computed (both the per-layer output metric and the embedding use it).
 *
 * @module
 */

import { type LayerInfo, referenceAttention } from "../encoder/use_lite.ts";
import { meanPerHead, shiftPerHead } from "./metrics.ts";
import type { KVMethod } from "./quantizers.ts";

/** Attention of one layer: q, k, v and the result are `[numHeads, tokens, headDim]`. */
export type AttendFn = (
  info: LayerInfo,
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
) => Promise<Float32Array>;

/**
 * K and V after a round trip through `method`. With `centreKeys`, the per-head per-channel mean
 * key of these tokens is subtracted before encoding and added back after decoding (for
 * attention the shift is free: softmax ignores the q.mu added to all of a query's scores).
 * Float formats are never centred (it would only add f32 rounding).
 */
export function quantizeKV(
  method: KVMethod,
  info: LayerInfo,
  k: Float32Array,
  v: Float32Array,
  centreKeys: boolean,
): { k: Float32Array; v: Float32Array } {
  const { numHeads, headDim } = info;
  let kq: Float32Array;
  if (centreKeys && method.family !== "float") {
    const mu = meanPerHead(k, numHeads, headDim);
    kq = shiftPerHead(
      method.roundTrip(shiftPerHead(k, mu, numHeads, -1), headDim),
      mu,
      numHeads,
      1,
    );
  } else {
    kq = method.roundTrip(k, headDim);
  }
  return { k: kq, v: method.roundTrip(v, headDim) };
}

/**
 * Attention over K/V stored in `method`'s format: today a CPU decode followed by exact f64
 * attention ({@linkcode referenceAttention}).
 *
 * GPU switch point: for `method.family === "turboquant"` this is where the library's GPU cache
 * goes, one cache per layer since the encoder's head_dim differs between layers:
 *
 * ```ts
 * const cache = new TurboQuantKVCache(device, {
 *   numLayers: 1, numKvHeads: info.numHeads, headDim: info.headDim,
 *   keyBits: method.codec.bits, valueBits: method.codec.bits,
 *   blockSize: method.codec.blockSize, keyCentering: centreKeys,
 * });
 * await cache.append(0, k, v);
 * const out = await cache.attention(0, q, { numHeads: info.numHeads, causal: false });
 * cache.destroy();
 * ```
 *
 * (The encoder's score scale `info.scale` is 1/sqrt(headDim), the cache's default; the cache
 * centres keys on the mean of its first append, here the whole paragraph, as the CPU path.)
 */
export function attendWithCodec(method: KVMethod, centreKeys: boolean): AttendFn {
  return (info, q, k, v) => {
    const kv = quantizeKV(method, info, k, v, centreKeys);
    return Promise.resolve(referenceAttention(info, q, kv.k, kv.v).output);
  };
}
