/**
 * The uncompressed KV cache (f32 or f16 storage): the baseline TurboQuant is compared
 * against, with the same API and an equally careful attention kernel.
 *
 * @module
 */

import { UNCOMPRESSED_APPEND_WGSL } from "../_shaders/uncompressed_append.ts";
import { UNCOMPRESSED_DEQUANTIZE_WGSL } from "../_shaders/uncompressed_dequantize.ts";
import {
  encodeUncompressedAttention,
  uncompressedAttentionPipelines,
} from "../attention/uncompressed_attention.ts";
import { check } from "../errors.ts";
import { composeShader, getPipeline } from "../gpu/_pipelines.ts";
import { uniformLayout } from "../gpu/_uniforms.ts";
import {
  type AppendEncoder,
  type AttentionEncoder,
  type AttentionShape,
  type DequantizeEncoder,
  KVCacheBase,
  type KVCacheBaseOptions,
} from "./kv_cache_base.ts";

/** Options of {@linkcode UncompressedKVCache}. */
export interface UncompressedKVCacheOptions extends KVCacheBaseOptions {
  /** Storage type; default `"f32"`. f16 works on every adapter (packed in u32 words). */
  dtype?: "f32" | "f16";
}

/** Largest head dimension the kernels support. */
export const MAX_HEAD_DIM = 512;

const COPY_PARAMS = uniformLayout({
  tokens: "u32",
  kv_heads: "u32",
  token0: "u32",
  groups_x: "u32",
});

/** 1D dispatch of `n` workgroups folded into x and y (x is capped at 65535). */
function fold(n: number): [number, number] {
  const x = Math.min(n, 65535);
  return [x, Math.ceil(n / x)];
}

/**
 * A KV cache that stores keys and values as they are (f32, or f16 rounded to nearest), on the
 * GPU, with split-K attention. Same API as the TurboQuant cache.
 *
 * @example Append two tokens and attend
 * ```ts
 * import { requestTurboQuantDevice, UncompressedKVCache } from "@turboquant/turboquant";
 * const device = await requestTurboQuantDevice();
 * const cache = new UncompressedKVCache(device, { numLayers: 1, numKvHeads: 2, headDim: 64 });
 * const kv = new Float32Array(2 * 2 * 64).map(() => Math.random() - 0.5);
 * await cache.append(0, kv, kv);
 * const q = new Float32Array(4 * 1 * 64).fill(0.1); // 4 query heads, 1 token
 * const out = await cache.attention(0, q, { numHeads: 4 });
 * console.log(out.length, cache.seqLen(0), cache.memoryUsage());
 * cache.destroy();
 * device.destroy();
 * ```
 */
export class UncompressedKVCache extends KVCacheBase {
  /** Storage type. */
  readonly dtype: "f32" | "f16";
  /** Test hooks: forced chunk size and reduce fan-in. */
  protected attentionOverrides: { chunkTokens?: number; fanIn?: number } = {};

  /**
   * Creates an empty cache (buffers are allocated by the first append, or now when
   * `initialCapacity` is given).
   *
   * @param device Device from {@linkcode requestTurboQuantDevice} (or any with enough limits).
   * @param options Shape and dtype; headDim a multiple of 8 up to 512.
   */
  constructor(device: GPUDevice, options: UncompressedKVCacheOptions) {
    KVCacheBase.checkBaseOptions(device, options);
    const dtype = options.dtype ?? "f32";
    check(
      dtype === "f32" || dtype === "f16",
      `dtype ${JSON.stringify(dtype)} is not "f32" or "f16"`,
    );
    check(
      options.headDim % 8 === 0 && options.headDim <= MAX_HEAD_DIM,
      `headDim ${options.headDim} is not a multiple of 8 in [8, ${MAX_HEAD_DIM}]`,
    );
    const bytesPerToken = options.numKvHeads * options.headDim * (dtype === "f16" ? 2 : 4);
    super(
      device,
      options,
      [{ name: "k", bytesPerToken }, { name: "v", bytesPerToken }],
      `turboquant/uncompressed-kv-cache-${dtype}`,
    );
    this.dtype = dtype;
  }

  #copyPipeline(code: string, what: string): Promise<GPUComputePipeline> {
    return getPipeline(this.device, {
      label: `turboquant/uncompressed-${what}-${this.dtype}-hd${this.headDim}`,
      code: composeShader({ HD: this.headDim, F16: this.dtype === "f16" }, code),
    });
  }

  /** Transposes [head][token][d] f32 into token-major storage (converting to f16). */
  protected override async appendEncoder(): Promise<AppendEncoder> {
    const pipeline = await this.#copyPipeline(UNCOMPRESSED_APPEND_WGSL, "append");
    return (job) => {
      const groups = Math.ceil((job.tokens * this.numKvHeads * this.headDim) / 4 / 64);
      const [gx, gy] = fold(groups);
      const uniform = job.uniforms.slot(COPY_PARAMS.pack({
        tokens: job.tokens,
        kv_heads: this.numKvHeads,
        token0: job.start - job.window.start,
        groups_x: gx,
      }));
      const bytes = this.numKvHeads * job.tokens * this.headDim * 4;
      const pass = job.beginComputePass("uncompressed-append");
      pass.setPipeline(pipeline);
      pass.setBindGroup(
        0,
        job.device.createBindGroup({
          label: "turboquant/uncompressed-append",
          layout: pipeline.getBindGroupLayout(0),
          entries: [
            { binding: 0, resource: uniform },
            { binding: 1, resource: { buffer: job.k, size: bytes } },
            { binding: 2, resource: { buffer: job.v, size: bytes } },
            { binding: 3, resource: job.window.binding("k") },
            { binding: 4, resource: job.window.binding("v") },
          ],
        }),
      );
      pass.dispatchWorkgroups(gx, gy);
      pass.end();
    };
  }

  /** Split-K attention (one workgroup per KV head x query block x token chunk) + reduce. */
  protected override async attentionEncoder(shape: AttentionShape): Promise<AttentionEncoder> {
    const f16 = this.dtype === "f16";
    const rows = (shape.numHeads / this.numKvHeads) * shape.qTokens;
    const pipelines = await uncompressedAttentionPipelines(this.device, this.headDim, rows, f16);
    return (job) => {
      encodeUncompressedAttention(
        job,
        pipelines,
        f16,
        this.numKvHeads,
        this.headDim,
        this.bindingLimitBytes(),
        this.attentionOverrides,
      );
    };
  }

  /** Token-major storage back to [head][token][d] f32. */
  protected override async dequantizeEncoder(): Promise<DequantizeEncoder> {
    const pipeline = await this.#copyPipeline(UNCOMPRESSED_DEQUANTIZE_WGSL, "dequantize");
    return (job) => {
      const tokens = job.window.tokens;
      const groups = Math.ceil((tokens * this.numKvHeads * this.headDim) / 4 / 64);
      const [gx, gy] = fold(groups);
      const uniform = job.uniforms.slot(COPY_PARAMS.pack({
        tokens,
        kv_heads: this.numKvHeads,
        token0: 0,
        groups_x: gx,
      }));
      const pass = job.beginComputePass("uncompressed-dequantize");
      pass.setPipeline(pipeline);
      pass.setBindGroup(
        0,
        job.device.createBindGroup({
          label: "turboquant/uncompressed-dequantize",
          layout: pipeline.getBindGroupLayout(0),
          entries: [
            { binding: 0, resource: uniform },
            { binding: 1, resource: job.window.binding("k") },
            { binding: 2, resource: job.window.binding("v") },
            { binding: 3, resource: { buffer: job.kOut } },
            { binding: 4, resource: { buffer: job.vOut } },
          ],
        }),
      );
      pass.dispatchWorkgroups(gx, gy);
      pass.end();
    };
  }
}
