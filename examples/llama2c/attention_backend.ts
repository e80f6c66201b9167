/**
 * The pluggable attention of the llama2.c decoder. The library's `TurboQuantKVCache` and
 * `UncompressedKVCache` have exactly these methods, so they plug in as they are; the classes
 * here are exact (or codec-simulating) CPU references.
 *
 * Shapes (DESIGN.md section 4): K and V are appended as [numKvHeads, tokens, headDim]; queries
 * and results are [numHeads, qTokens, headDim]; the qTokens queries are the last qTokens
 * positions, and with `causal` query i sees positions 0 .. seqLen - qTokens + i.
 *
 * @module
 */

/** Options of one attention call. */
export interface AttentionOptions {
  /** Number of query heads; a multiple of numKvHeads (grouped-query attention). */
  numHeads: number;
  /** Score scale; default 1 / sqrt(headDim). */
  scale?: number;
  /** Mask future positions (default true here). */
  causal?: boolean;
}

/** A KV cache that computes attention over what was appended to it. */
export interface AttentionBackend {
  /** Appends K and V of new tokens, each [numKvHeads, tokens, headDim]. */
  append(layer: number, k: Float32Array, v: Float32Array): Promise<void>;
  /** Attention of q [numHeads, qTokens, headDim] over the layer's cache; same-shaped result. */
  attention(layer: number, q: Float32Array, options: AttentionOptions): Promise<Float32Array>;
  /** Empties every layer. */
  reset(): Promise<void>;
}

/** Runs fn and hands back its result or its error through a promise (throws become rejections). */
function settle<T>(fn: () => T): Promise<T> {
  try {
    return Promise.resolve(fn());
  } catch (e) {
    return Promise.reject(e);
  }
}

/** Shape of a CPU backend's cache. */
export interface CpuBackendOptions {
  /** Number of layers. */
  numLayers: number;
  /** Number of KV heads. */
  numKvHeads: number;
  /** Per-head width. */
  headDim: number;
  /** Tokens to reserve per layer up front (grows as needed). */
  initialCapacity?: number;
}

/**
 * Exact f32 attention on the CPU. Each layer stores K and V as [numKvHeads, capacity, headDim];
 * grouped-query attention maps query head h to KV head floor(h / (numHeads / numKvHeads)).
 */
export class CpuAttentionBackend implements AttentionBackend {
  /** Number of layers. */
  readonly numLayers: number;
  /** Number of KV heads. */
  readonly numKvHeads: number;
  /** Per-head width. */
  readonly headDim: number;
  #k: Float32Array[] = [];
  #v: Float32Array[] = [];
  #len: number[] = [];
  #cap: number[] = [];

  /**
   * Allocates empty per-layer storage.
   * @param options Cache shape.
   */
  constructor(options: CpuBackendOptions) {
    const { numLayers, numKvHeads, headDim, initialCapacity = 64 } = options;
    for (const [name, v] of Object.entries({ numLayers, numKvHeads, headDim, initialCapacity })) {
      if (!Number.isInteger(v) || v <= 0) {
        throw new RangeError(`${name} must be a positive integer, got ${v}`);
      }
    }
    this.numLayers = numLayers;
    this.numKvHeads = numKvHeads;
    this.headDim = headDim;
    for (let l = 0; l < numLayers; l++) {
      this.#k.push(new Float32Array(numKvHeads * initialCapacity * headDim));
      this.#v.push(new Float32Array(numKvHeads * initialCapacity * headDim));
      this.#len.push(0);
      this.#cap.push(initialCapacity);
    }
  }

  #checkLayer(layer: number): void {
    if (!Number.isInteger(layer) || layer < 0 || layer >= this.numLayers) {
      throw new RangeError(`layer must be in 0..${this.numLayers - 1}, got ${layer}`);
    }
  }

  /** Tokens stored in a layer. */
  seqLen(layer: number): number {
    this.#checkLayer(layer);
    return this.#len[layer];
  }

  /** Tokens a layer can hold before it grows. */
  capacity(layer: number): number {
    this.#checkLayer(layer);
    return this.#cap[layer];
  }

  /** Hook for subclasses: transforms K/V (same shape) before they are stored. */
  protected transform(
    _layer: number,
    k: Float32Array,
    v: Float32Array,
    _tokens: number,
  ): { k: Float32Array; v: Float32Array } {
    return { k, v };
  }

  /** Appends K and V, each [numKvHeads, tokens, headDim]. */
  append(layer: number, k: Float32Array, v: Float32Array): Promise<void> {
    return settle(() => {
      this.#checkLayer(layer);
      const per = this.numKvHeads * this.headDim;
      if (k.length !== v.length || k.length === 0 || k.length % per !== 0) {
        throw new RangeError(
          `k and v must both be [numKvHeads=${this.numKvHeads}, tokens, headDim=${this.headDim}], ` +
            `got lengths ${k.length} and ${v.length}`,
        );
      }
      const tokens = k.length / per;
      const t = this.transform(layer, k, v, tokens);
      if (t.k.length !== k.length || t.v.length !== v.length) {
        throw new RangeError(
          `codec changed the K/V length (${k.length} -> ${t.k.length}/${t.v.length})`,
        );
      }
      const len = this.#len[layer];
      this.#reserve(layer, len + tokens);
      const cap = this.#cap[layer];
      const d = this.headDim;
      for (let h = 0; h < this.numKvHeads; h++) {
        const src = h * tokens * d;
        const dst = (h * cap + len) * d;
        this.#k[layer].set(t.k.subarray(src, src + tokens * d), dst);
        this.#v[layer].set(t.v.subarray(src, src + tokens * d), dst);
      }
      this.#len[layer] = len + tokens;
    });
  }

  /** Grows a layer's storage (head-major, so every head's rows move). */
  #reserve(layer: number, needed: number): void {
    const cap = this.#cap[layer];
    if (needed <= cap) return;
    const next = Math.max(needed, cap * 2);
    const d = this.headDim;
    const len = this.#len[layer];
    for (const store of [this.#k, this.#v]) {
      const old = store[layer];
      const grown = new Float32Array(this.numKvHeads * next * d);
      for (let h = 0; h < this.numKvHeads; h++) {
        grown.set(old.subarray(h * cap * d, (h * cap + len) * d), h * next * d);
      }
      store[layer] = grown;
    }
    this.#cap[layer] = next;
  }

  /** Exact softmax attention; see the module doc for shapes and masking. */
  attention(layer: number, q: Float32Array, options: AttentionOptions): Promise<Float32Array> {
    return settle(() => {
      this.#checkLayer(layer);
      const { numHeads, causal = true } = options;
      const d = this.headDim;
      const scale = options.scale ?? 1 / Math.sqrt(d);
      if (!Number.isInteger(numHeads) || numHeads <= 0 || numHeads % this.numKvHeads !== 0) {
        throw new RangeError(
          `numHeads must be a positive multiple of numKvHeads=${this.numKvHeads}, got ${numHeads}`,
        );
      }
      if (q.length === 0 || q.length % (numHeads * d) !== 0) {
        throw new RangeError(
          `q must be [numHeads=${numHeads}, qTokens, headDim=${d}], got ${q.length}`,
        );
      }
      const qTokens = q.length / (numHeads * d);
      const seqLen = this.#len[layer];
      if (qTokens > seqLen) {
        throw new RangeError(`qTokens ${qTokens} exceeds the layer's seqLen ${seqLen}`);
      }
      const group = numHeads / this.numKvHeads;
      const cap = this.#cap[layer];
      const K = this.#k[layer];
      const V = this.#v[layer];
      const out = new Float32Array(q.length);
      const scores = new Float64Array(seqLen);
      const acc = new Float64Array(d);
      for (let h = 0; h < numHeads; h++) {
        const base = Math.floor(h / group) * cap * d;
        for (let i = 0; i < qTokens; i++) {
          const qo = (h * qTokens + i) * d;
          const visible = causal ? seqLen - qTokens + i + 1 : seqLen;
          let max = -Infinity;
          for (let t = 0; t < visible; t++) {
            const ko = base + t * d;
            let s = 0;
            for (let j = 0; j < d; j++) s += q[qo + j] * K[ko + j];
            s *= scale;
            scores[t] = s;
            if (s > max) max = s;
          }
          let sum = 0;
          acc.fill(0);
          for (let t = 0; t < visible; t++) {
            const w = Math.exp(scores[t] - max);
            sum += w;
            const vo = base + t * d;
            for (let j = 0; j < d; j++) acc[j] += w * V[vo + j];
          }
          for (let j = 0; j < d; j++) out[qo + j] = acc[j] / sum;
        }
      }
      return out;
    });
  }

  /** The stored K and V of a layer, each [numKvHeads, seqLen, headDim]. */
  dequantize(layer: number): Promise<{ k: Float32Array; v: Float32Array }> {
    return settle(() => {
      this.#checkLayer(layer);
      const len = this.#len[layer];
      const cap = this.#cap[layer];
      const d = this.headDim;
      const k = new Float32Array(this.numKvHeads * len * d);
      const v = new Float32Array(k.length);
      for (let h = 0; h < this.numKvHeads; h++) {
        k.set(this.#k[layer].subarray(h * cap * d, (h * cap + len) * d), h * len * d);
        v.set(this.#v[layer].subarray(h * cap * d, (h * cap + len) * d), h * len * d);
      }
      return { k, v };
    });
  }

  /** Drops every position from `length` on (one layer, or all). */
  truncate(length: number, layer?: number): Promise<void> {
    return settle(() => {
      const layers = layer === undefined ? [...this.#len.keys()] : [layer];
      for (const l of layers) {
        this.#checkLayer(l);
        if (!Number.isInteger(length) || length < 0 || length > this.#len[l]) {
          throw new RangeError(`length must be in 0..${this.#len[l]}, got ${length}`);
        }
        this.#len[l] = length;
      }
    });
  }

  /** Empties every layer (capacity is kept). */
  reset(): Promise<void> {
    this.#len.fill(0);
    return Promise.resolve();
  }
}

/**
 * A quantize-then-dequantize round trip of K or V values, shape [numKvHeads, tokens, headDim]
 * in and out (vectors of headDim values are contiguous).
 */
export type CodecRoundTrip = (x: Float32Array, kind: "k" | "v", layer: number) => Float32Array;

/** Options of {@linkcode SimulatedCodecBackend}. */
export interface SimulatedCodecOptions extends CpuBackendOptions {
  /**
   * Subtract, per layer, KV head and channel, the mean key of the first append before the
   * codec and add it back after (softmax ignores the shift; the codes stop spending range on
   * it). Default false, so the codec sees raw keys unless asked.
   */
  keyCentering?: boolean;
}

/**
 * Exact attention over codec-degraded K/V: every append goes through `codec` first. Lets the
 * decoder be evaluated with a CPU codec before the GPU cache exists.
 */
export class SimulatedCodecBackend extends CpuAttentionBackend {
  readonly #codec: CodecRoundTrip;
  readonly #centering: boolean;
  #means: (Float32Array | null)[];

  /**
   * Wraps exact attention around a codec round trip.
   * @param options Cache shape and whether keys are centred.
   * @param codec Quantize-dequantize function applied to appended K and V.
   */
  constructor(options: SimulatedCodecOptions, codec: CodecRoundTrip) {
    super(options);
    this.#codec = codec;
    this.#centering = options.keyCentering ?? false;
    this.#means = new Array(options.numLayers).fill(null);
  }

  /** Runs K and V through the codec (centring keys around the first append's mean if asked). */
  protected override transform(
    layer: number,
    k: Float32Array,
    v: Float32Array,
    tokens: number,
  ): { k: Float32Array; v: Float32Array } {
    const d = this.headDim;
    if (!this.#centering) {
      return { k: this.#codec(k, "k", layer), v: this.#codec(v, "v", layer) };
    }
    let mean = this.#means[layer];
    if (!mean) {
      mean = new Float32Array(this.numKvHeads * d);
      for (let h = 0; h < this.numKvHeads; h++) {
        for (let t = 0; t < tokens; t++) {
          for (let j = 0; j < d; j++) mean[h * d + j] += k[(h * tokens + t) * d + j] / tokens;
        }
      }
      this.#means[layer] = mean;
    }
    const shifted = new Float32Array(k.length);
    for (let h = 0; h < this.numKvHeads; h++) {
      for (let t = 0; t < tokens; t++) {
        const o = (h * tokens + t) * d;
        for (let j = 0; j < d; j++) shifted[o + j] = k[o + j] - mean[h * d + j];
      }
    }
    const kq = this.#codec(shifted, "k", layer);
    for (let h = 0; h < this.numKvHeads; h++) {
      for (let t = 0; t < tokens; t++) {
        const o = (h * tokens + t) * d;
        for (let j = 0; j < d; j++) kq[o + j] += mean[h * d + j];
      }
    }
    return { k: kq, v: this.#codec(v, "v", layer) };
  }

  /** Empties every layer and forgets the key means. */
  override reset(): Promise<void> {
    this.#means.fill(null);
    return super.reset();
  }
}
