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
import { TurboQuantKVCache } from "../../mod.ts";

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

/** Bit widths whose TurboQuant attention runs in the GPU cache (the others on the CPU). */
export const GPU_BITS: readonly number[] = [2, 3, 4];

/**
 * Attention over K/V stored in `method`'s format. TurboQuant at {@linkcode GPU_BITS} with a
 * `device`: the library's GPU cache stores K and V (one cache per layer: the encoder's head_dim
 * differs between layers) and its fused kernel attends over the packed codes. Otherwise a CPU
 * round trip through the format, then exact attention ({@linkcode referenceAttention}); the
 * CPU codec writes the same codes as the GPU, so only float rounding differs.
 *
 * The encoder's score scale `info.scale` is 1/sqrt(headDim), the cache's default; the cache
 * centres keys on the mean of its first append, here the whole paragraph, as the CPU path.
 */
export function attendWithCodec(
  method: KVMethod,
  centreKeys: boolean,
  device?: GPUDevice | null,
): AttendFn {
  const codec = method.codec;
  if (device && method.family === "turboquant" && codec && GPU_BITS.includes(codec.bits)) {
    return async (info, q, k, v) => {
      const cache = new TurboQuantKVCache(device, {
        numLayers: 1,
        numKvHeads: info.numHeads,
        headDim: info.headDim,
        keyBits: codec.bits,
        valueBits: codec.bits,
        blockSize: codec.blockSize,
        keyCentering: centreKeys,
      });
      try {
        await cache.append(0, k, v);
        return await cache.attention(0, q, { numHeads: info.numHeads, causal: false });
      } finally {
        cache.destroy();
      }
    };
  }
  return (info, q, k, v) => {
    const kv = quantizeKV(method, info, k, v, centreKeys);
    return Promise.resolve(referenceAttention(info, q, kv.k, kv.v).output);
  };
}
