/**
 * The TurboQuant KV cache: keys and values stored as packed TurboQuant codes on the GPU,
 * encoded there (bit-identical to {@linkcode TurboQuantCodec}), with attention computed
 * straight from the codes.
 *
 * @module
 */

import { type EncodedVectors, TurboQuantCodec } from "../codec/codec.ts";
import { check } from "../errors.ts";
import { readBuffer } from "../gpu/_buffers.ts";
import { TurboQuantAttention } from "../attention/_tq_attention.ts";
import { type CodecRows, type Recorder, rowWordsOf, TurboQuantCoder } from "./_tq_coder.ts";
import {
  type AppendEncoder,
  type AttentionEncoder,
  type AttentionShape,
  type DequantizeEncoder,
  KVCacheBase,
  type KVCacheBaseOptions,
  type LayerStorage,
} from "./kv_cache_base.ts";

/** Options of {@linkcode TurboQuantKVCache}. */
export interface KVCacheOptions extends KVCacheBaseOptions {
  /** Bits per key value, 1 to 8 (2 to 8 in prod mode); default 4. */
  keyBits?: number;
  /** Bits per value, 1 to 8; default 3. */
  valueBits?: number;
  /** Values rotated and scaled together (power of two dividing headDim); default up to 32. */
  blockSize?: number;
  /** "mse" (default) or "prod" (unbiased scores through a 1-bit QJL sketch) for keys. */
  keyMode?: "mse" | "prod";
  /**
   * Subtract the mean key of each layer's first append (per KV head and channel) before
   * quantizing keys (default true). Attention is unchanged by it (softmax ignores a shift
   * shared by all of a query's scores); `dequantize` adds the mean back.
   */
  keyCentering?: boolean;
  /** Seed of the rotations and of the QJL matrix; default 0. */
  seed?: number;
  /** Candidate scales per block (see {@linkcode CodecOptions}); default 9. */
  scaleSearch?: number;
}

/** The packed codes of one layer as the CPU codec's {@linkcode EncodedVectors}. */
export interface EncodedLayer {
  /** Keys, vectors ordered [numKvHeads][seqLen] (centred when keyCentering is on). */
  keys: EncodedVectors;
  /** Values, vectors ordered [numKvHeads][seqLen]. */
  values: EncodedVectors;
}

const NAMES = ["kIndex", "kScales", "kSigns", "kNorms", "vIndex", "vScales"] as const;

/**
 * A KV cache that keeps keys and values TurboQuant-compressed on the GPU (default 4-bit keys
 * and 3-bit values: 4.5 and 3.5 bits per value with scales, 4x smaller than f16) and computes
 * attention from the packed codes.
 *
 * @example Append, attend, read back
 * ```ts
 * import { requestTurboQuantDevice, TurboQuantKVCache } from "@turboquant/turboquant";
 * const device = await requestTurboQuantDevice();
 * const cache = new TurboQuantKVCache(device, { numLayers: 1, numKvHeads: 2, headDim: 64 });
 * const k = new Float32Array(2 * 16 * 64).map(() => Math.random() - 0.5); // 16 tokens
 * await cache.append(0, k, k);
 * const q = new Float32Array(8 * 1 * 64).fill(0.1); // 8 query heads, 1 token
 * const out = await cache.attention(0, q, { numHeads: 8 });
 * const { k: keys } = await cache.dequantize(0);
 * console.log(out.length, keys.length, cache.memoryUsage());
 * cache.destroy();
 * device.destroy();
 * ```
 */
export class TurboQuantKVCache extends KVCacheBase {
  /** The keys' codec (same codes as the GPU writes). */
  readonly keyCodec: TurboQuantCodec;
  /** The values' codec. */
  readonly valueCodec: TurboQuantCodec;
  /** Whether keys are centred by the mean key of each layer's first append. */
  readonly keyCentering: boolean;
  readonly #keys: TurboQuantCoder;
  readonly #values: TurboQuantCoder;
  readonly #means: GPUBuffer[];
  readonly #attention = new Map<number, Promise<TurboQuantAttention>>();

  /**
   * Creates an empty cache (buffers are allocated by the first append unless
   * `initialCapacity` is given).
   *
   * @param device Device from {@linkcode requestTurboQuantDevice}.
   * @param options Shape, bits and codec options; invalid values throw TurboQuantError.
   */
  constructor(device: GPUDevice, options: KVCacheOptions) {
    KVCacheBase.checkBaseOptions(device, options);
    const { numKvHeads, headDim } = options;
    check(
      headDim % 8 === 0 && headDim <= 256,
      `headDim ${headDim} is not a multiple of 8 in [8, 256]`,
    );
    const keyCentering = options.keyCentering ?? true;
    check(typeof keyCentering === "boolean", `keyCentering ${keyCentering} is not a boolean`);
    const seed = options.seed ?? 0;
    check(
      Number.isInteger(seed) && seed >= 0 && seed <= 0xffffffff,
      `seed ${seed} is not a u32 integer`,
    );
    for (const name of ["keyBits", "valueBits"] as const) {
      const bits = options[name];
      const min = name === "keyBits" && options.keyMode === "prod" ? 2 : 1;
      check(
        bits === undefined || (Number.isInteger(bits) && bits >= min && bits <= 8),
        `${name} ${bits} is not an integer from ${min} to 8`,
      );
    }
    const common = { headDim, blockSize: options.blockSize, scaleSearch: options.scaleSearch };
    const keyCodec = new TurboQuantCodec({
      ...common,
      bits: options.keyBits ?? 4,
      mode: options.keyMode ?? "mse",
      seed,
    });
    const valueCodec = new TurboQuantCodec({
      ...common,
      bits: options.valueBits ?? 3,
      seed,
    });
    check(
      keyCodec.blockSize <= 256,
      `blockSize ${keyCodec.blockSize} is larger than the GPU kernels' 256`,
    );
    const k = rowWordsOf(keyCodec, numKvHeads);
    const v = rowWordsOf(valueCodec, numKvHeads);
    const specs = [
      { name: "kIndex", bytesPerToken: 4 * k.index },
      { name: "kScales", bytesPerToken: 4 * k.scales },
      ...(keyCodec.mode === "prod"
        ? [
          { name: "kSigns", bytesPerToken: 4 * k.signs },
          { name: "kNorms", bytesPerToken: 4 * k.norms },
        ]
        : []),
      { name: "vIndex", bytesPerToken: 4 * v.index },
      { name: "vScales", bytesPerToken: 4 * v.scales },
    ];
    super(device, options, specs, "turboquant/turboquant-kv-cache");
    this.keyCodec = keyCodec;
    this.valueCodec = valueCodec;
    this.keyCentering = keyCentering;
    const table = (label: string, data: Float32Array) =>
      this.createPersistentBuffer(label, data.byteLength, GPUBufferUsage.STORAGE, data);
    this.#keys = new TurboQuantCoder(device, keyCodec, numKvHeads, table);
    this.#values = new TurboQuantCoder(device, valueCodec, numKvHeads, table);
    this.#means = keyCentering
      ? Array.from({ length: options.numLayers }, (_, l) =>
        this.createPersistentBuffer(
          `key-mean/layer${l}`,
          4 * numKvHeads * headDim,
          GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC,
        ))
      : [];
  }

  /** Stored bits per value of keys and values together (scales included), averaged. */
  get bitsPerValue(): number {
    return (this.keyCodec.bitsPerValue + this.valueCodec.bitsPerValue) / 2;
  }

  /**
   * The key mean subtracted from `layer`'s keys (f32 [numKvHeads, headDim]), or null when
   * keyCentering is off or the layer is empty.
   */
  async keyMean(layer: number): Promise<Float32Array | null> {
    if (!this.keyCentering || this.seqLen(layer) === 0) return null;
    return new Float32Array(await readBuffer(this.device, this.#means[layer]));
  }

  /**
   * The packed codes and scales of `layer`, in the CPU codec's format (for inspection, tests
   * and serialisation): `keyCodec.decode(keys)` gives the (centred) keys.
   */
  async readEncoded(layer: number): Promise<EncodedLayer> {
    const seqLen = this.seqLen(layer);
    const st = this.layerStorage(layer);
    const read = async (name: string) =>
      seqLen === 0 ? new ArrayBuffer(0) : await readBuffer(
        this.device,
        st.buffer(name),
        0,
        seqLen * st.bytesPerTokenOf(name),
      );
    const [kIndex, kScales, kSigns, kNorms, vIndex, vScales] = await Promise.all(
      NAMES.map((n) =>
        this.bufferSpecs.some((s) => s.name === n) ? read(n) : Promise.resolve(null)
      ),
    );
    return {
      keys: this.#toEncoded(this.#keys, seqLen, kIndex!, kScales!, kSigns, kNorms),
      values: this.#toEncoded(this.#values, seqLen, vIndex!, vScales!, null, null),
    };
  }

  /** Token-major packed rows to the codec's head-major EncodedVectors. */
  #toEncoded(
    coder: TurboQuantCoder,
    seqLen: number,
    index: ArrayBuffer,
    scales: ArrayBuffer,
    signs: ArrayBuffer | null,
    norms: ArrayBuffer | null,
  ): EncodedVectors {
    const c = coder.codec;
    const heads = this.numKvHeads;
    const count = heads * seqLen;
    const out: EncodedVectors = {
      count,
      indices: new Uint32Array(count * c.wordsPerVector),
      scales: new Uint16Array(count * c.numBlocks),
    };
    const idx = new Uint32Array(index);
    const sc = new Uint16Array(scales);
    const sg = signs ? new Uint32Array(signs) : null;
    const nm = norms ? new Uint16Array(norms) : null;
    if (sg && nm) {
      out.signs = new Uint32Array(count * c.signWordsPerVector);
      out.residualNorms = new Uint16Array(count);
    }
    const w = coder.rowWords;
    for (let t = 0; t < seqLen; t++) {
      for (let h = 0; h < heads; h++) {
        const v = h * seqLen + t;
        const from = t * w.index + h * c.wordsPerVector;
        out.indices.set(idx.subarray(from, from + c.wordsPerVector), v * c.wordsPerVector);
        const s = t * 2 * w.scales + h * c.numBlocks;
        out.scales.set(sc.subarray(s, s + c.numBlocks), v * c.numBlocks);
        if (sg && nm && out.signs && out.residualNorms) {
          const g = t * w.signs + h * c.signWordsPerVector;
          out.signs.set(sg.subarray(g, g + c.signWordsPerVector), v * c.signWordsPerVector);
          out.residualNorms[v] = nm[t * 2 * w.norms + h];
        }
      }
    }
    return out;
  }

  #rows(st: LayerStorage, kind: "k" | "v"): CodecRows {
    if (kind === "v") return { index: st.buffer("vIndex"), scales: st.buffer("vScales") };
    const prod = this.keyCodec.mode === "prod";
    return {
      index: st.buffer("kIndex"),
      scales: st.buffer("kScales"),
      signs: prod ? st.buffer("kSigns") : undefined,
      norms: prod ? st.buffer("kNorms") : undefined,
    };
  }

  /** Quantizes on the GPU: key mean at position 0 (when centring), then K and V rows. */
  protected override async appendEncoder(): Promise<AppendEncoder> {
    await Promise.all([this.#keys.prepare(this.keyCentering), this.#values.prepare(false)]);
    return (job) => {
      const rec: Recorder = job;
      const scratch = job.scratch(
        "tq-scratch",
        Math.max(this.#keys.scratchBytes(job.tokens), this.#values.scratchBytes(job.tokens)) + 512,
      );
      const mean = this.keyCentering ? this.#means[job.layer] : null;
      // An append at position 0 starts the layer (first append, or after truncate(0)/reset):
      // its keys set the mean. Stateless, so a failed append changes nothing.
      if (mean && job.start === 0) this.#keys.recordMean(rec, job.k, job.tokens, mean);
      this.#keys.recordEncode(
        rec,
        job.k,
        job.tokens,
        mean,
        this.#rows(job.storage, "k"),
        job.start,
        scratch,
      );
      this.#values.recordEncode(
        rec,
        job.v,
        job.tokens,
        null,
        this.#rows(job.storage, "v"),
        job.start,
        scratch,
      );
    };
  }

  /** Fused attention over the packed codes (rotate queries, split-K, merge). */
  protected override async attentionEncoder(shape: AttentionShape): Promise<AttentionEncoder> {
    // One kernel object per GQA group size: its pipelines are specialised for it.
    const group = shape.numHeads / this.numKvHeads;
    let kernel = this.#attention.get(group);
    if (!kernel) {
      kernel = TurboQuantAttention.create(
        this.device,
        this.keyCodec,
        this.valueCodec,
        this.numKvHeads,
        { group },
      );
      this.#attention.set(group, kernel);
      kernel.catch(() => this.#attention.delete(group));
    }
    const attention = await kernel;
    const prod = this.keyCodec.mode === "prod";
    return (job) => {
      const st = job.storage;
      attention.record(
        job,
        {
          kIndex: st.buffer("kIndex"),
          kScales: st.buffer("kScales"),
          vIndex: st.buffer("vIndex"),
          vScales: st.buffer("vScales"),
          kSigns: prod ? st.buffer("kSigns") : undefined,
          kNorms: prod ? st.buffer("kNorms") : undefined,
        },
        job.seqLen,
        job.q,
        job.out,
        {
          numHeads: job.numHeads,
          qTokens: job.qTokens,
          scale: job.scale,
          causal: job.causal,
        },
      );
    };
  }

  /** Frees every GPU buffer, the attention kernels' scratch included. */
  override destroy(): void {
    super.destroy();
    for (const kernel of this.#attention.values()) kernel.then((a) => a.destroy(), () => {});
    this.#attention.clear();
  }

  /** Decodes rows on the GPU (adding the key mean back). */
  protected override async dequantizeEncoder(): Promise<DequantizeEncoder> {
    await Promise.all([this.#keys.prepare(this.keyCentering), this.#values.prepare(false)]);
    return (job) => {
      const { start, tokens } = job.window;
      const mean = this.keyCentering ? this.#means[job.layer] : null;
      // The output buffers hold only this window's tokens.
      const out = (buffer: GPUBuffer) => ({ buffer, seqLen: tokens, first: 0 });
      this.#keys.recordDequantize(
        job,
        this.#rows(job.storage, "k"),
        start,
        tokens,
        mean,
        out(job.kOut),
      );
      this.#values.recordDequantize(
        job,
        this.#rows(job.storage, "v"),
        start,
        tokens,
        null,
        out(job.vOut),
      );
    };
  }
}
