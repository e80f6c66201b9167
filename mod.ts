/**
 * TurboQuant for Deno and WebGPU: keep a transformer's KV cache compressed on the GPU
 * (random rotation + Lloyd-Max scalar codes, 2-8 bits per value) and compute attention
 * straight from the compressed cache.
 *
 * @example Encode and decode vectors on the CPU
 * ```ts
 * import { TurboQuantCodec } from "@turboquant/turboquant";
 * const codec = new TurboQuantCodec({ headDim: 128, bits: 3 });
 * const x = new Float32Array(128).map(() => Math.random() - 0.5);
 * const decoded = codec.decode(codec.encode(x));
 * console.log(codec.bitsPerValue, decoded.length);
 * ```
 *
 * @module
 */

export { TurboQuantError, type TurboQuantErrorCode } from "./src/errors.ts";
export { type CodecOptions, type EncodedVectors, TurboQuantCodec } from "./src/codec/codec.ts";
export { type Codebook, lloydMaxCodebook } from "./src/codec/codebook.ts";
export {
  type EncodedLayer,
  type KVCacheOptions,
  TurboQuantKVCache,
} from "./src/cache/turboquant_kv_cache.ts";
export {
  type AdapterDescription,
  describeAdapter,
  type DeviceOptions,
  requestTurboQuantDevice,
} from "./src/gpu/device.ts";
export {
  type AppendEncoder,
  type AppendJob,
  type AttentionBufferOptions,
  type AttentionEncoder,
  type AttentionJob,
  type AttentionOptions,
  type AttentionShape,
  type CacheJob,
  type DequantizedLayer,
  type DequantizeEncoder,
  type DequantizeJob,
  KVCacheBase,
  type KVCacheBaseOptions,
  LayerStorage,
  type StorageWindow,
  type TokenBufferSpec,
  type UniformSlots,
} from "./src/cache/kv_cache_base.ts";
export {
  UncompressedKVCache,
  type UncompressedKVCacheOptions,
} from "./src/cache/uncompressed_kv_cache.ts";
export { cpuAttention, type CpuAttentionOptions } from "./src/attention/cpu_reference.ts";
