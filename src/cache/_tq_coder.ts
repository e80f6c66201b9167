/**
 * Host side of the TurboQuant cache kernels for one codec (the keys' or the values'): encode
 * rows into the cache (tq_encode + tq_pack, plus tq_sketch in prod mode), the key mean, and
 * dequantize. Codes and scales equal those of {@linkcode TurboQuantCodec} with the same options.
 *
 * @module
 */

import type { TurboQuantCodec } from "../codec/codec.ts";
import { rowWindow } from "../gpu/_buffers.ts";
import { composeShader, getPipeline } from "../gpu/_pipelines.ts";
import { uniformLayout } from "../gpu/_uniforms.ts";
import { TQ_COMMON_WGSL } from "../_shaders/_tq_common.ts";
import { TQ_ENCODE_WGSL } from "../_shaders/tq_encode.ts";
import { TQ_PACK_WGSL } from "../_shaders/tq_pack.ts";
import { TQ_SKETCH_WGSL } from "../_shaders/tq_sketch.ts";
import { TQ_KEY_MEAN_WGSL } from "../_shaders/tq_key_mean.ts";
import { TQ_DEQUANTIZE_WGSL } from "../_shaders/tq_dequantize.ts";

const WORKGROUP = 64;

const ENCODE_PARAMS = uniformLayout({ tokens: "u32", heads: "u32", center: "u32", width: "u32" });
const PACK_PARAMS = uniformLayout({
  tokens: "u32",
  heads: "u32",
  index_dst: "u32",
  scale_dst: "u32",
  width: "u32",
});
const SKETCH_PARAMS = uniformLayout({
  tokens: "u32",
  heads: "u32",
  sign_dst: "u32",
  norm_dst: "u32",
  width: "u32",
});
const MEAN_PARAMS = uniformLayout({ tokens: "u32", head_dim: "u32" });
const DEQUANTIZE_PARAMS = uniformLayout({
  tokens: "u32",
  heads: "u32",
  first_token: "u32",
  seq_len: "u32",
  index_src: "u32",
  scale_src: "u32",
  center: "u32",
  width: "u32",
});

/** Where commands go: uniform slots and labelled compute passes (a cache job is one). */
export interface Recorder {
  readonly uniforms: { slot(bytes: Uint8Array): GPUBufferBinding };
  beginComputePass(label: string): GPUComputePassEncoder;
}

/** The per-token row sizes, in u32 words, of the buffers one codec writes. */
export interface RowWords {
  index: number;
  scales: number;
  signs: number;
  norms: number;
}

/** Cache rows of one codec: buffers in token-major layout. */
export interface CodecRows {
  index: GPUBuffer;
  scales: GPUBuffer;
  signs?: GPUBuffer;
  norms?: GPUBuffer;
}

/** Per-token row sizes of a cache with `heads` KV heads coded by `codec`. */
export function rowWordsOf(codec: TurboQuantCodec, heads: number): RowWords {
  const prod = codec.mode === "prod";
  return {
    index: heads * codec.wordsPerVector,
    scales: Math.ceil((heads * codec.numBlocks) / 2),
    signs: prod ? heads * codec.signWordsPerVector : 0,
    norms: prod ? Math.ceil(heads / 2) : 0,
  };
}

/** The f32 tables every kernel reads: signs, boundaries, centroids, scale factors. */
function tablesOf(codec: TurboQuantCodec): Float32Array {
  const levels = 1 << codec.codeBits;
  const t = new Float32Array(codec.headDim + 2 * levels - 1 + codec.scaleSearch);
  t.set(codec.signs, 0);
  t.set(codec.boundaries, codec.headDim);
  t.set(codec.centroids, codec.headDim + levels - 1);
  t.set(codec.scaleFactors, codec.headDim + 2 * levels - 1);
  return t;
}

function constantsOf(codec: TurboQuantCodec): Record<string, number | boolean> {
  return {
    HEAD_DIM: codec.headDim,
    BLOCK: codec.blockSize,
    NUM_BLOCKS: codec.numBlocks,
    CODE_BITS: codec.codeBits,
    LEVELS: 1 << codec.codeBits,
    WORDS: codec.wordsPerVector,
    SIGN_WORDS: Math.max(1, codec.signWordsPerVector),
    SEARCH: codec.scaleSearch,
    NORM_CORRECTION: codec.normCorrection,
    FWHT_SCALE: Math.fround(1 / Math.sqrt(codec.blockSize)),
  };
}

type Pipelines = Record<
  "encode" | "pack" | "sketch" | "mean" | "dequantize",
  GPUComputePipeline | undefined
>;

/** The GPU side of one codec for a cache with `heads` KV heads. */
export class TurboQuantCoder {
  readonly device: GPUDevice;
  readonly codec: TurboQuantCodec;
  readonly heads: number;
  readonly rowWords: RowWords;
  readonly #tables: GPUBuffer;
  readonly #qjl: GPUBuffer | undefined;
  #pipelines: Pipelines = {
    encode: undefined,
    pack: undefined,
    sketch: undefined,
    mean: undefined,
    dequantize: undefined,
  };

  /**
   * @param makeBuffer Creates the read-only table buffers (the owner counts and frees them).
   */
  constructor(
    device: GPUDevice,
    codec: TurboQuantCodec,
    heads: number,
    makeBuffer: (label: string, data: Float32Array) => GPUBuffer,
  ) {
    this.device = device;
    this.codec = codec;
    this.heads = heads;
    this.rowWords = rowWordsOf(codec, heads);
    this.#tables = makeBuffer("codec-tables", tablesOf(codec));
    this.#qjl = codec.qjlMatrix ? makeBuffer("qjl-matrix", codec.qjlMatrix) : undefined;
  }

  /** Compiles (or takes from the per-device cache) the kernels; call before recording. */
  async prepare(withMean: boolean): Promise<void> {
    const device = this.device;
    const codec = this.codec;
    const code = (kernel: string) => composeShader(constantsOf(codec), TQ_COMMON_WGSL, kernel);
    const [encode, pack, sketch, mean, dequantize] = await Promise.all([
      getPipeline(device, { label: "turboquant/tq-encode", code: code(TQ_ENCODE_WGSL) }),
      getPipeline(device, { label: "turboquant/tq-pack", code: code(TQ_PACK_WGSL) }),
      codec.mode === "prod"
        ? getPipeline(device, { label: "turboquant/tq-sketch", code: code(TQ_SKETCH_WGSL) })
        : undefined,
      withMean
        ? getPipeline(device, {
          label: "turboquant/tq-key-mean",
          code: composeShader({}, TQ_KEY_MEAN_WGSL),
        })
        : undefined,
      getPipeline(device, { label: "turboquant/tq-dequantize", code: code(TQ_DEQUANTIZE_WGSL) }),
    ]);
    this.#pipelines = { encode, pack, sketch, mean, dequantize };
  }

  /** Scratch bytes one `encode` of `tokens` tokens needs. */
  scratchBytes(tokens: number): number {
    return 4 * tokens * this.heads * (2 * this.codec.headDim + this.codec.numBlocks);
  }

  /**
   * Records the mean over `tokens` tokens of `src` ([heads][tokens][headDim] f32) into
   * `keyMean` ([heads][headDim] f32).
   */
  recordMean(rec: Recorder, src: GPUBuffer, tokens: number, keyMean: GPUBuffer): void {
    const d = this.codec.headDim;
    this.#dispatch(rec, this.#pipelines.mean!, [
      rec.uniforms.slot(MEAN_PARAMS.pack({ tokens, head_dim: d })),
      { buffer: src, size: tokens * this.heads * d * 4 },
      { buffer: keyMean },
    ], [d, this.heads]);
  }

  /**
   * Records the encoding of `tokens` tokens of `src` ([heads][tokens][headDim] f32) into the
   * rows `firstToken ..` of `rows`, using `scratch` (at least `scratchBytes(tokens)` bytes).
   */
  recordEncode(
    rec: Recorder,
    src: GPUBuffer,
    tokens: number,
    keyMean: GPUBuffer | null,
    rows: CodecRows,
    firstToken: number,
    scratch: GPUBuffer,
  ): void {
    const { headDim: d, numBlocks: nb } = this.codec;
    const h = this.heads;
    const codesBytes = 4 * tokens * h * d;
    const scalesBytes = 4 * tokens * h * nb;
    const codes = { buffer: scratch, offset: 0, size: codesBytes };
    const scales = { buffer: scratch, offset: roundTo256(codesBytes), size: scalesBytes };
    const residual = {
      buffer: scratch,
      offset: roundTo256(codesBytes) + roundTo256(scalesBytes),
      size: codesBytes,
    };
    const blocks = tokens * h * nb;
    const [ex, ey] = grid(blocks, this.device);
    this.#dispatch(rec, this.#pipelines.encode!, [
      rec.uniforms.slot(ENCODE_PARAMS.pack({
        tokens,
        heads: h,
        center: keyMean ? 1 : 0,
        width: ex * WORKGROUP,
      })),
      { buffer: src, size: 4 * tokens * h * d },
      { buffer: this.#tables },
      { buffer: keyMean ?? this.#tables },
      codes,
      scales,
      residual,
    ], [ex, ey]);

    const index = rowWindow(this.device, rows.index, this.rowWords.index, firstToken, tokens);
    const scaleRows = rowWindow(this.device, rows.scales, this.rowWords.scales, firstToken, tokens);
    const words = tokens * (this.rowWords.index + this.rowWords.scales);
    const [px, py] = grid(words, this.device);
    this.#dispatch(rec, this.#pipelines.pack!, [
      rec.uniforms.slot(PACK_PARAMS.pack({
        tokens,
        heads: h,
        index_dst: index.wordOffset,
        scale_dst: scaleRows.wordOffset,
        width: px * WORKGROUP,
      })),
      codes,
      scales,
      index.binding,
      scaleRows.binding,
    ], [px, py]);

    if (this.#pipelines.sketch && rows.signs && rows.norms) {
      const signs = rowWindow(this.device, rows.signs, this.rowWords.signs, firstToken, tokens);
      const norms = rowWindow(this.device, rows.norms, this.rowWords.norms, firstToken, tokens);
      const [sx, sy] = grid(tokens * (this.rowWords.signs + this.rowWords.norms), this.device);
      this.#dispatch(rec, this.#pipelines.sketch, [
        rec.uniforms.slot(SKETCH_PARAMS.pack({
          tokens,
          heads: h,
          sign_dst: signs.wordOffset,
          norm_dst: norms.wordOffset,
          width: sx * WORKGROUP,
        })),
        residual,
        { buffer: this.#qjl! },
        signs.binding,
        norms.binding,
      ], [sx, sy]);
    }
  }

  /**
   * Records the decoding of rows `firstToken .. firstToken + tokens` into `dst.buffer`
   * ([heads][dst.seqLen][headDim] f32) at positions `dst.first ..`, adding `keyMean` if given.
   */
  recordDequantize(
    rec: Recorder,
    rows: CodecRows,
    firstToken: number,
    tokens: number,
    keyMean: GPUBuffer | null,
    dst: { buffer: GPUBuffer; seqLen: number; first: number },
  ): void {
    const index = rowWindow(this.device, rows.index, this.rowWords.index, firstToken, tokens);
    const scales = rowWindow(this.device, rows.scales, this.rowWords.scales, firstToken, tokens);
    const [x, y] = grid(tokens * this.heads * this.codec.numBlocks, this.device);
    this.#dispatch(rec, this.#pipelines.dequantize!, [
      rec.uniforms.slot(DEQUANTIZE_PARAMS.pack({
        tokens,
        heads: this.heads,
        first_token: dst.first,
        seq_len: dst.seqLen,
        index_src: index.wordOffset,
        scale_src: scales.wordOffset,
        center: keyMean ? 1 : 0,
        width: x * WORKGROUP,
      })),
      index.binding,
      scales.binding,
      { buffer: this.#tables },
      { buffer: keyMean ?? this.#tables },
      { buffer: dst.buffer },
    ], [x, y]);
  }

  #dispatch(
    rec: Recorder,
    pipeline: GPUComputePipeline,
    resources: GPUBufferBinding[],
    [x, y]: number[],
  ): void {
    const bindGroup = this.device.createBindGroup({
      label: `turboquant/${pipeline.label.replace("turboquant/", "")}-bind`,
      layout: pipeline.getBindGroupLayout(0),
      entries: resources.map((resource, binding) => ({ binding, resource })),
    });
    const pass = rec.beginComputePass(pipeline.label.replace("turboquant/", ""));
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, bindGroup);
    pass.dispatchWorkgroups(x, y);
    pass.end();
  }
}

function roundTo256(n: number): number {
  return Math.ceil(n / 256) * 256;
}

/** A 2D grid of 64-invocation workgroups covering `n` invocations. */
function grid(n: number, device: GPUDevice): [number, number] {
  const groups = Math.max(1, Math.ceil(n / WORKGROUP));
  const maxX = device.limits.maxComputeWorkgroupsPerDimension;
  if (groups <= maxX) return [groups, 1];
  const y = Math.ceil(groups / maxX);
  return [Math.ceil(groups / y), y];
}
