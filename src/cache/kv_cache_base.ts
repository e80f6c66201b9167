/**
 * The cache framework shared by {@linkcode UncompressedKVCache} and the TurboQuant cache:
 * per-layer storage with growth, per-layer locks, input validation, error scopes, device-loss
 * handling, binding windows for buffers above the binding limit, readback and timing. A
 * subclass declares its per-token buffers and supplies three encoders (append, attention,
 * dequantize) that record GPU commands for a prepared job.
 *
 * @module
 */

import { check, describe, TurboQuantError } from "../errors.ts";
import {
  checkDeviceAlive,
  toTurboQuantError,
  trackDevice,
  withErrorScopes,
} from "../gpu/_errors.ts";
import { encodeRead, GpuTimer, type PendingRead } from "../gpu/_buffers.ts";
import { UniformArena } from "../gpu/_uniforms.ts";
import { AsyncLock, runWithAll } from "./_layer_lock.ts";
import {
  grownCapacity,
  LayerStorage,
  type StorageWindow,
  type TokenBufferSpec,
  WINDOW_ALIGN_TOKENS,
} from "./_layer_storage.ts";

export type { StorageWindow, TokenBufferSpec } from "./_layer_storage.ts";
export { LayerStorage } from "./_layer_storage.ts";

/** Options every KV cache takes. */
export interface KVCacheBaseOptions {
  /** Transformer layers (one storage and one lock each). */
  numLayers: number;
  /** KV heads per layer. */
  numKvHeads: number;
  /** Values per head. */
  headDim: number;
  /** Tokens to allocate per layer up front; default 0 (the first append allocates). */
  initialCapacity?: number;
  /**
   * Time every operation's compute passes with timestamp queries (when the device has
   * "timestamp-query"), readable from `lastGpuTimeMs`. Costs a readback per operation.
   */
  timings?: boolean;
}

/** Options of `attention`. */
export interface AttentionOptions {
  /** Query heads: a positive multiple of `numKvHeads`. */
  numHeads: number;
  /** Score scale; default `1 / sqrt(headDim)`. */
  scale?: number;
  /** Query i of qTokens sees positions `0 .. seqLen - qTokens + i` (default false). */
  causal?: boolean;
}

/** Options of `attentionBuffers`. */
export interface AttentionBufferOptions extends AttentionOptions {
  /** Query tokens in the q buffer ([numHeads, qTokens, headDim] f32). */
  qTokens: number;
  /** Output buffer (STORAGE usage, at least q's size); a new one is created when absent. */
  out?: GPUBuffer;
}

/** Keys and values of a layer, each [numKvHeads, seqLen, headDim] f32. */
export interface DequantizedLayer {
  /** Keys. */
  k: Float32Array;
  /** Values. */
  v: Float32Array;
}

/** Uniform structs of one operation, packed into few buffers. */
export interface UniformSlots {
  /** Stores one packed struct (see `uniformLayout`) and returns its binding. */
  slot(bytes: Uint8Array): GPUBufferBinding;
}

/** What every encoder job offers. */
export interface CacheJob {
  /** The cache's device. */
  readonly device: GPUDevice;
  /** Layer index. */
  readonly layer: number;
  /** The layer's storage (buffers, length, capacity, generation). */
  readonly storage: LayerStorage;
  /** Encoder the job records into; the framework submits it. */
  readonly encoder: GPUCommandEncoder;
  /** Uniform structs of this job: `uniforms.slot(layout.pack(...))` gives a binding. */
  readonly uniforms: UniformSlots;
  /** A buffer that lives until the job's commands are submitted (then destroyed). */
  scratch(label: string, size: number, usage?: number, data?: ArrayBufferView): GPUBuffer;
  /** Begins a compute pass (with timestamp writes when timings are on). */
  beginComputePass(label: string): GPUComputePassEncoder;
  /** Timestamp writes for a pass the job begins itself (undefined when timings are off). */
  passTimestamps(): GPUComputePassTimestampWrites | undefined;
}

/** An append of `tokens` tokens at position `start`, all inside one binding `window`. */
export interface AppendJob extends CacheJob {
  /** Absolute position of the first new token. */
  readonly start: number;
  /** Tokens in this job (an append may be split into several jobs). */
  readonly tokens: number;
  /** Binding window that contains [start, start + tokens). */
  readonly window: StorageWindow;
  /** New keys, f32 [numKvHeads, tokens, headDim] from offset 0 (uploaded on first access). */
  readonly k: GPUBuffer;
  /** New values, same layout as `k`. */
  readonly v: GPUBuffer;
  /** The same keys/values on the CPU when the append came from Float32Arrays, else null. */
  readonly cpu: { readonly k: Float32Array; readonly v: Float32Array } | null;
}

/** One attention call over the whole layer. */
export interface AttentionJob extends CacheJob {
  /** Tokens in the layer. */
  readonly seqLen: number;
  /** Query heads. */
  readonly numHeads: number;
  /** Query tokens (the last qTokens positions). */
  readonly qTokens: number;
  /** Query heads per KV head. */
  readonly groupSize: number;
  /** Score scale. */
  readonly scale: number;
  /** Causal masking. */
  readonly causal: boolean;
  /** Queries, f32 [numHeads, qTokens, headDim] from offset 0 (STORAGE). */
  readonly q: GPUBuffer;
  /** Output, f32 [numHeads, qTokens, headDim] from offset 0 (STORAGE); write every value. */
  readonly out: GPUBuffer;
  /** Binding windows covering [0, seqLen), in order. */
  readonly windows: readonly StorageWindow[];
}

/** Decode tokens [window.start, window.start + window.tokens) to f32. */
export interface DequantizeJob extends CacheJob {
  /** The tokens to decode (one binding window). */
  readonly window: StorageWindow;
  /** Keys out, f32 [numKvHeads, window.tokens, headDim] (STORAGE | COPY_SRC). */
  readonly kOut: GPUBuffer;
  /** Values out, same layout as `kOut`. */
  readonly vOut: GPUBuffer;
}

/** Records an append job's commands (synchronously: no awaits). */
export type AppendEncoder = (job: AppendJob) => void;
/** Records an attention job's commands (synchronously). */
export type AttentionEncoder = (job: AttentionJob) => void;
/** Records a dequantize job's commands (synchronously). */
export type DequantizeEncoder = (job: DequantizeJob) => void;

/** Shape of one attention call, given to `attentionEncoder` to pick pipelines. */
export interface AttentionShape {
  /** Layer index. */
  readonly layer: number;
  /** Tokens in the layer. */
  readonly seqLen: number;
  /** Query heads. */
  readonly numHeads: number;
  /** Query tokens. */
  readonly qTokens: number;
  /** Causal masking. */
  readonly causal: boolean;
}

type AppendSource =
  | { kind: "cpu"; k: Float32Array; v: Float32Array }
  | { kind: "gpu"; k: GPUBuffer; v: GPUBuffer };

/** Per-operation resources: encoder, scratch buffers, uniforms, timer. */
class OperationContext {
  readonly encoder: GPUCommandEncoder;
  readonly uniforms: UniformArena;
  readonly #device: GPUDevice;
  readonly #label: string;
  readonly #scratch: GPUBuffer[] = [];
  readonly #timer: GpuTimer | null;

  constructor(device: GPUDevice, label: string, timed: boolean) {
    this.#device = device;
    this.#label = label;
    this.encoder = device.createCommandEncoder({ label });
    this.uniforms = new UniformArena(device, `${label}/uniforms`);
    this.#timer = timed ? new GpuTimer(device, 32) : null;
  }

  scratch(label: string, size: number, usage?: number, data?: ArrayBufferView): GPUBuffer {
    const byteSize = Math.max(16, Math.ceil(size / 16) * 16);
    const buffer = this.#device.createBuffer({
      label: `${this.#label}/${label}`,
      size: byteSize,
      usage: usage ?? (GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST),
      mappedAtCreation: data !== undefined,
    });
    if (data) {
      new Uint8Array(buffer.getMappedRange()).set(
        new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
      );
      buffer.unmap();
    }
    this.#scratch.push(buffer);
    return buffer;
  }

  passTimestamps(): GPUComputePassTimestampWrites | undefined {
    return this.#timer?.passTimestamps();
  }

  beginComputePass(label: string): GPUComputePassEncoder {
    return this.encoder.beginComputePass({
      label: `${this.#label}/${label}`,
      timestampWrites: this.#timer?.passTimestamps(),
    });
  }

  /** Submits the encoder and destroys scratch buffers (WebGPU defers the free). */
  submit(): void {
    this.#timer?.resolve(this.encoder);
    this.uniforms.finish();
    this.#device.queue.submit([this.encoder.finish()]);
    this.dispose();
  }

  dispose(): void {
    for (const b of this.#scratch) b.destroy();
    this.#scratch.length = 0;
    this.uniforms.destroy();
  }

  /** Total GPU ms of the timed passes, or null. */
  async gpuMs(): Promise<number | null> {
    if (!this.#timer) return null;
    try {
      const ms = await this.#timer.readMs();
      return ms ? ms.reduce((a, b) => a + b, 0) : null;
    } finally {
      this.#timer.destroy();
    }
  }
}

function isInt(n: unknown): n is number {
  return typeof n === "number" && Number.isInteger(n);
}

/**
 * Base of the KV caches: storage, growth, locks, validation and submission. Subclasses give
 * the per-token buffers to the constructor and implement `appendEncoder`,
 * `attentionEncoder` and `dequantizeEncoder`.
 *
 * @example A cache subclass in outline (UncompressedKVCache is the full example)
 * ```ts ignore
 * class MyCache extends KVCacheBase {
 *   constructor(device: GPUDevice, options: KVCacheBaseOptions) {
 *     const bytes = options.numKvHeads * options.headDim * 4;
 *     super(device, options, [{ name: "k", bytesPerToken: bytes }, { name: "v", bytesPerToken: bytes }], "turboquant/my-cache");
 *   }
 *   protected async appendEncoder(): Promise<AppendEncoder> { return (job) => {/* dispatch *\/}; }
 *   protected async attentionEncoder(): Promise<AttentionEncoder> { return (job) => {}; }
 *   protected async dequantizeEncoder(): Promise<DequantizeEncoder> { return (job) => {}; }
 * }
 * ```
 */
export abstract class KVCacheBase {
  /** The device all buffers live on. */
  readonly device: GPUDevice;
  /** Transformer layers. */
  readonly numLayers: number;
  /** KV heads per layer. */
  readonly numKvHeads: number;
  /** Values per head. */
  readonly headDim: number;
  /** Per-token buffers of every layer. */
  readonly bufferSpecs: readonly TokenBufferSpec[];

  readonly #label: string;
  readonly #layers: LayerStorage[];
  readonly #locks: AsyncLock[];
  readonly #persistent: GPUBuffer[] = [];
  readonly #timings: boolean;
  readonly #ready: Promise<void>;
  #destroyed = false;
  #lastGpuTimeMs: number | null = null;

  /**
   * Validates the options and specs, then allocates `initialCapacity` tokens per layer.
   *
   * @param device Device for all buffers.
   * @param options Shape of the cache.
   * @param specs Per-token buffers (name, bytesPerToken: a positive multiple of 4).
   * @param label GPU object label prefix, `turboquant/<what>`.
   */
  protected constructor(
    device: GPUDevice,
    options: KVCacheBaseOptions,
    specs: readonly TokenBufferSpec[],
    label: string,
  ) {
    KVCacheBase.checkBaseOptions(device, options);
    check(specs.length > 0, `${label}: no buffer specs`);
    const names = new Set<string>();
    for (const s of specs) {
      check(
        isInt(s.bytesPerToken) && s.bytesPerToken > 0 && s.bytesPerToken % 4 === 0,
        `${label}: buffer "${s.name}" bytesPerToken ${s.bytesPerToken} is not a positive multiple of 4`,
      );
      check(!names.has(s.name), `${label}: duplicate buffer name "${s.name}"`);
      names.add(s.name);
    }
    this.device = device;
    this.numLayers = options.numLayers;
    this.numKvHeads = options.numKvHeads;
    this.headDim = options.headDim;
    this.bufferSpecs = specs.map((s) => ({ name: s.name, bytesPerToken: s.bytesPerToken }));
    this.#label = label;
    this.#timings = options.timings ?? false;
    trackDevice(device);
    const maxBpt = Math.max(...specs.map((s) => s.bytesPerToken));
    if (maxBpt * WINDOW_ALIGN_TOKENS > this.bindingLimitBytes()) {
      throw new TurboQuantError(
        "out-of-memory",
        `${label}: ${maxBpt} bytes per token: ${WINDOW_ALIGN_TOKENS} tokens exceed the binding limit ` +
          `of ${this.bindingLimitBytes()} bytes`,
      );
    }
    this.#layers = Array.from(
      { length: options.numLayers },
      (_, l) => new LayerStorage(l, this.bufferSpecs, label),
    );
    this.#locks = this.#layers.map(() => new AsyncLock());
    const initial = options.initialCapacity ?? 0;
    if (initial > this.maxTokens) {
      throw new TurboQuantError(
        "out-of-memory",
        `${label}: initialCapacity ${initial} exceeds the ${this.maxTokens} tokens a layer can hold ` +
          `(maxBufferSize ${this.bufferLimitBytes()} bytes / ${maxBpt} bytes per token)`,
      );
    }
    this.#ready = initial > 0 ? this.#allocateInitial(initial) : Promise.resolve();
    // Surface a failed initial allocation at the next operation, not as an unhandled rejection.
    this.#ready.catch(() => {});
  }

  /** Validates the options every cache takes (throws `"invalid-argument"`). */
  protected static checkBaseOptions(device: GPUDevice, options: KVCacheBaseOptions): void {
    check(
      typeof GPUDevice === "undefined" || device instanceof GPUDevice,
      `device ${describe(device)} is not a GPUDevice`,
    );
    check(typeof options === "object" && options !== null, `options ${options} is not an object`);
    check(
      isInt(options.numLayers) && options.numLayers >= 1,
      `numLayers ${describe(options.numLayers)} is not a positive integer`,
    );
    check(
      isInt(options.numKvHeads) && options.numKvHeads >= 1,
      `numKvHeads ${describe(options.numKvHeads)} is not a positive integer`,
    );
    check(
      isInt(options.headDim) && options.headDim >= 1,
      `headDim ${describe(options.headDim)} is not a positive integer`,
    );
    check(
      options.initialCapacity === undefined ||
        (isInt(options.initialCapacity) && options.initialCapacity >= 0),
      `initialCapacity ${describe(options.initialCapacity)} is not a non-negative integer`,
    );
    check(
      options.timings === undefined || typeof options.timings === "boolean",
      `timings ${describe(options.timings)} is not a boolean`,
    );
  }

  // ---- hooks for subclasses -------------------------------------------------------------

  /** Prepares (compiles) what appends need and returns the synchronous encoder. */
  protected abstract appendEncoder(layer: number): Promise<AppendEncoder>;
  /** Prepares what an attention call of this shape needs and returns its encoder. */
  protected abstract attentionEncoder(shape: AttentionShape): Promise<AttentionEncoder>;
  /** Prepares what dequantize needs and returns its encoder. */
  protected abstract dequantizeEncoder(layer: number): Promise<DequantizeEncoder>;

  /** Called (under the layer's lock) after `truncate` set the layer's length. */
  protected onTruncate(_layer: number, _length: number): void {}

  /** Called (under the layer's lock) after `reset` emptied the layer. */
  protected onReset(_layer: number): void {}

  /**
   * Largest binding, in bytes (the device's maxStorageBufferBindingSize). Buffers above it are
   * bound in windows. Tests override it to exercise windows on small caches.
   */
  protected bindingLimitBytes(): number {
    return this.device.limits.maxStorageBufferBindingSize;
  }

  /** Largest buffer, in bytes (the device's maxBufferSize). */
  protected bufferLimitBytes(): number {
    return this.device.limits.maxBufferSize;
  }

  /**
   * Creates a persistent buffer owned by the cache (codebooks, rotations, per-layer means):
   * counted by `memoryUsage`, destroyed by `destroy`.
   */
  protected createPersistentBuffer(
    label: string,
    size: number,
    usage: number,
    data?: ArrayBufferView,
  ): GPUBuffer {
    const buffer = this.device.createBuffer({
      label: `${this.#label}/${label}`,
      size: Math.max(4, Math.ceil(size / 4) * 4),
      usage,
      mappedAtCreation: data !== undefined,
    });
    if (data) {
      new Uint8Array(buffer.getMappedRange()).set(
        new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
      );
      buffer.unmap();
    }
    this.#persistent.push(buffer);
    return buffer;
  }

  /** The storage of `layer` (for subclasses; do not change length or buffers directly). */
  protected layerStorage(layer: number): LayerStorage {
    return this.#layers[layer];
  }

  // ---- limits ---------------------------------------------------------------------------

  /** Most tokens one layer can hold (maxBufferSize over the largest bytes per token). */
  get maxTokens(): number {
    const maxBpt = Math.max(...this.bufferSpecs.map((s) => s.bytesPerToken));
    return Math.floor(this.bufferLimitBytes() / maxBpt);
  }

  /** Tokens per binding window (a multiple of 256). */
  protected get windowTokens(): number {
    const maxBpt = Math.max(...this.bufferSpecs.map((s) => s.bytesPerToken));
    const fit = Math.floor(this.bindingLimitBytes() / maxBpt);
    return Math.floor(fit / WINDOW_ALIGN_TOKENS) * WINDOW_ALIGN_TOKENS;
  }

  /** Most tokens of one append job: its f32 source must fit one binding. */
  get #maxAppendJobTokens(): number {
    const fit = Math.floor(this.bindingLimitBytes() / (this.numKvHeads * this.headDim * 4));
    return Math.max(1, fit);
  }

  // ---- public API -----------------------------------------------------------------------

  /** GPU milliseconds of the latest timed operation (needs `timings: true`), else null. */
  get lastGpuTimeMs(): number | null {
    return this.#lastGpuTimeMs;
  }

  /** Tokens stored in `layer`. */
  seqLen(layer: number): number {
    this.#checkLayer("seqLen", layer);
    return this.#layers[layer].length;
  }

  /** Tokens `layer` can hold before it grows. */
  capacity(layer: number): number {
    this.#checkLayer("capacity", layer);
    return this.#layers[layer].capacity;
  }

  /** Exact persistent GPU bytes: every layer's capacity times bytes per token, plus tables. */
  memoryUsage(): number {
    let bytes = 0;
    for (const st of this.#layers) bytes += st.bytes;
    for (const b of this.#persistent) bytes += b.size;
    return bytes;
  }

  /**
   * Appends `tokens` tokens to `layer`; `k` and `v` are [numKvHeads, tokens, headDim]. Inputs
   * are validated (lengths, finite values) before any GPU work, and copied at call time.
   */
  async append(layer: number, k: Float32Array, v: Float32Array): Promise<void> {
    this.#checkUsable("append");
    this.#checkLayer("append", layer);
    const tokens = this.#checkKV(k, v);
    const source: AppendSource = { kind: "cpu", k: k.slice(), v: v.slice() };
    await this.#locks[layer].run(() => this.#appendLocked(layer, tokens, source));
  }

  /**
   * Appends `tokens` tokens from GPU buffers already on this device, f32
   * [numKvHeads, tokens, headDim] from offset 0, with STORAGE usage (plus COPY_SRC when an
   * append must be split, which the error says). Values are not checked for NaN.
   */
  async appendBuffers(
    layer: number,
    kBuffer: GPUBuffer,
    vBuffer: GPUBuffer,
    tokens: number,
  ): Promise<void> {
    this.#checkUsable("appendBuffers");
    this.#checkLayer("appendBuffers", layer);
    check(
      isInt(tokens) && tokens >= 1,
      `appendBuffers: tokens ${describe(tokens)} is not a positive integer`,
    );
    const bytes = this.numKvHeads * tokens * this.headDim * 4;
    this.#checkBuffer("appendBuffers", "kBuffer", kBuffer, bytes);
    this.#checkBuffer("appendBuffers", "vBuffer", vBuffer, bytes);
    const source: AppendSource = { kind: "gpu", k: kBuffer, v: vBuffer };
    await this.#locks[layer].run(() => this.#appendLocked(layer, tokens, source));
  }

  /**
   * Attention of `q` ([numHeads, qTokens, headDim]) over `layer`; returns the same shape.
   * The qTokens queries are the last qTokens positions.
   */
  async attention(
    layer: number,
    q: Float32Array,
    options: AttentionOptions,
  ): Promise<Float32Array> {
    this.#checkUsable("attention");
    this.#checkLayer("attention", layer);
    check(q instanceof Float32Array, `attention: q ${describe(q)} is not a Float32Array`);
    const numHeads = this.#checkAttentionOptions("attention", options);
    const rowValues = numHeads * this.headDim;
    check(
      q.length > 0 && q.length % rowValues === 0,
      `attention: q.length ${q.length} is not numHeads (${numHeads}) * qTokens * headDim (${this.headDim})`,
    );
    const qTokens = q.length / rowValues;
    this.#checkQTokens("attention", layer, qTokens, q.byteLength);
    this.#checkFinite("attention", "q", q, numHeads, qTokens);
    const qc = q.slice();
    const pending = await this.#locks[layer].run(() =>
      this.#attentionLocked(layer, numHeads, qTokens, options, { data: qc })
    );
    const data = await pending.read!.read();
    await pending.timing;
    return new Float32Array(data);
  }

  /**
   * Attention with queries and output on the GPU ([numHeads, qTokens, headDim] f32, STORAGE
   * usage). Resolves once the work is submitted (queue order makes later GPU work see it) and
   * returns the output buffer: `options.out`, or a new buffer the caller owns.
   */
  async attentionBuffers(
    layer: number,
    q: GPUBuffer,
    options: AttentionBufferOptions,
  ): Promise<GPUBuffer> {
    this.#checkUsable("attentionBuffers");
    this.#checkLayer("attentionBuffers", layer);
    const numHeads = this.#checkAttentionOptions("attentionBuffers", options);
    check(
      isInt(options.qTokens) && options.qTokens >= 1,
      `attentionBuffers: qTokens ${describe(options.qTokens)} is not a positive integer`,
    );
    const bytes = numHeads * options.qTokens * this.headDim * 4;
    this.#checkBuffer("attentionBuffers", "q", q, bytes);
    if (options.out !== undefined) {
      this.#checkBuffer("attentionBuffers", "options.out", options.out, bytes);
    }
    this.#checkQTokens("attentionBuffers", layer, options.qTokens, bytes);
    const pending = await this.#locks[layer].run(() =>
      this.#attentionLocked(layer, numHeads, options.qTokens, options, {
        buffer: q,
        out: options.out,
      })
    );
    await pending.timing;
    return pending.out;
  }

  /** Keys and values of `layer` as f32 [numKvHeads, seqLen, headDim]. */
  async dequantize(layer: number): Promise<DequantizedLayer> {
    this.#checkUsable("dequantize");
    this.#checkLayer("dequantize", layer);
    return await this.#locks[layer].run(() => this.#dequantizeLocked(layer));
  }

  /**
   * Shortens `layer` (or every layer) to `length` tokens (rollback, e.g. rejected speculative
   * tokens): later appends overwrite, reads never see the dropped tokens. Capacity is kept.
   */
  async truncate(length: number, layer?: number): Promise<void> {
    this.#checkUsable("truncate");
    check(
      isInt(length) && length >= 0,
      `truncate: length ${describe(length)} is not a non-negative integer`,
    );
    if (layer !== undefined) this.#checkLayer("truncate", layer);
    const targets = layer === undefined ? this.#layers.map((_, l) => l) : [layer];
    await runWithAll(targets.map((l) => this.#locks[l]), () => {
      this.#checkUsable("truncate");
      for (const l of targets) {
        const len = this.#layers[l].length;
        check(length <= len, `truncate: length ${length} > seqLen ${len} of layer ${l}`);
      }
      for (const l of targets) {
        this.#layers[l].length = length;
        this.onTruncate(l, length);
      }
    });
  }

  /** Empties every layer (length 0, per-layer state of subclasses cleared); keeps capacity. */
  async reset(): Promise<void> {
    this.#checkUsable("reset");
    await runWithAll(this.#locks, () => {
      this.#checkUsable("reset");
      this.#layers.forEach((st, l) => {
        st.length = 0;
        this.onReset(l);
      });
    });
  }

  /**
   * Checks the invariants (buffers exist iff capacity > 0, length <= capacity, buffer sizes =
   * capacity * bytesPerToken, not destroyed); throws `"invalid-state"` naming the first broken.
   */
  validate(): void {
    const fail = (msg: string): never => {
      throw new TurboQuantError("invalid-state", `${this.#label}: ${msg}`);
    };
    if (this.#destroyed) fail("the cache is destroyed");
    for (const st of this.#layers) {
      const l = st.layer;
      if (!isInt(st.length) || st.length < 0) fail(`layer ${l}: length ${st.length} invalid`);
      if (st.length > st.capacity) {
        fail(`layer ${l}: length ${st.length} > capacity ${st.capacity}`);
      }
      if (st.capacity > this.maxTokens) {
        fail(`layer ${l}: capacity ${st.capacity} > maxTokens ${this.maxTokens}`);
      }
      if (st.allocated !== st.capacity > 0) {
        fail(
          `layer ${l}: buffers ${st.allocated ? "exist" : "missing"} at capacity ${st.capacity}`,
        );
      }
      for (const spec of this.bufferSpecs) {
        if (!st.allocated) break;
        const b = st.buffers().get(spec.name);
        if (!b) fail(`layer ${l}: buffer "${spec.name}" missing`);
        const want = st.capacity * spec.bytesPerToken;
        if (b!.size !== want) {
          fail(`layer ${l}: buffer "${spec.name}" has ${b!.size} bytes, expected ${want}`);
        }
      }
    }
  }

  /** Frees every GPU buffer; later calls reject with `"destroyed"`. Idempotent. */
  destroy(): void {
    if (this.#destroyed) return;
    this.#destroyed = true;
    for (const st of this.#layers) st.release();
    for (const b of this.#persistent) b.destroy();
    this.#persistent.length = 0;
  }

  /** Whether `destroy` was called. */
  get destroyed(): boolean {
    return this.#destroyed;
  }

  // ---- validation -----------------------------------------------------------------------

  #checkUsable(what: string): void {
    if (this.#destroyed) {
      throw new TurboQuantError("destroyed", `${what}: the cache ${this.#label} was destroyed`);
    }
    checkDeviceAlive(this.device, what);
  }

  #checkLayer(what: string, layer: number): void {
    check(
      isInt(layer) && layer >= 0 && layer < this.numLayers,
      `${what}: layer ${describe(layer)} is not an integer in [0, ${this.numLayers})`,
    );
  }

  #checkBuffer(what: string, name: string, buffer: GPUBuffer, bytes: number): void {
    check(
      typeof GPUBuffer === "undefined" || buffer instanceof GPUBuffer,
      `${what}: ${name} ${describe(buffer)} is not a GPUBuffer`,
    );
    check(
      (buffer.usage & GPUBufferUsage.STORAGE) !== 0,
      `${what}: ${name} (label "${buffer.label}") lacks GPUBufferUsage.STORAGE (usage ${buffer.usage})`,
    );
    check(
      buffer.size >= bytes,
      `${what}: ${name} (label "${buffer.label}") has ${buffer.size} bytes, needs ${bytes}`,
    );
  }

  /** Returns the token count of an append after checking lengths and values. */
  #checkKV(k: Float32Array, v: Float32Array): number {
    check(k instanceof Float32Array, `append: k ${describe(k)} is not a Float32Array`);
    check(v instanceof Float32Array, `append: v ${describe(v)} is not a Float32Array`);
    const row = this.numKvHeads * this.headDim;
    check(
      k.length > 0 && k.length % row === 0,
      `append: k.length ${k.length} is not numKvHeads (${this.numKvHeads}) * tokens * headDim (${this.headDim}) for tokens >= 1`,
    );
    check(
      v.length === k.length,
      `append: v.length ${v.length} differs from k.length ${k.length}`,
    );
    const tokens = k.length / row;
    this.#checkFinite("append", "k", k, this.numKvHeads, tokens);
    this.#checkFinite("append", "v", v, this.numKvHeads, tokens);
    return tokens;
  }

  #checkFinite(what: string, name: string, x: Float32Array, heads: number, tokens: number): void {
    for (let i = 0; i < x.length; i++) {
      const value = x[i];
      // x - x is 0 for finite values and NaN for NaN and +-Infinity.
      if (value - value !== 0) {
        const d = i % this.headDim;
        const t = Math.floor(i / this.headDim) % tokens;
        const h = Math.floor(i / (this.headDim * tokens));
        throw new TurboQuantError(
          "invalid-argument",
          `${what}: ${name}[head ${h}, token ${t}, dim ${d}] is ${value} (of ${heads} heads x ${tokens} tokens)`,
        );
      }
    }
  }

  /** Checks numHeads, scale, causal; returns numHeads. */
  #checkAttentionOptions(what: string, options: AttentionOptions): number {
    check(
      typeof options === "object" && options !== null,
      `${what}: options ${options} is not an object`,
    );
    const { numHeads, scale, causal } = options;
    check(
      isInt(numHeads) && numHeads >= 1 && numHeads % this.numKvHeads === 0,
      `${what}: numHeads ${
        describe(numHeads)
      } is not a positive multiple of numKvHeads ${this.numKvHeads}`,
    );
    check(
      scale === undefined || (typeof scale === "number" && Number.isFinite(scale)),
      `${what}: scale ${describe(scale)} is not a finite number`,
    );
    check(
      causal === undefined || typeof causal === "boolean",
      `${what}: causal ${describe(causal)} is not a boolean`,
    );
    return numHeads;
  }

  #checkQTokens(what: string, layer: number, qTokens: number, qBytes: number): void {
    const len = this.#layers[layer].length;
    if (len === 0) {
      throw new TurboQuantError("invalid-state", `${what}: layer ${layer} is empty (seqLen 0)`);
    }
    check(qTokens <= len, `${what}: qTokens ${qTokens} > seqLen ${len} of layer ${layer}`);
    check(
      qBytes <= this.bindingLimitBytes(),
      `${what}: q of ${qBytes} bytes exceeds the binding limit ${this.bindingLimitBytes()}; split the queries`,
    );
  }

  // ---- locked bodies --------------------------------------------------------------------

  /** Allocates every layer now (so capacity() is exact at once); errors surface later. */
  #allocateInitial(capacity: number): Promise<void> {
    this.device.pushErrorScope("validation");
    this.device.pushErrorScope("out-of-memory");
    for (const st of this.#layers) st.install(st.createBuffers(this.device, capacity), capacity);
    const oom = this.device.popErrorScope();
    const validation = this.device.popErrorScope();
    return Promise.all([oom, validation]).then(([o, v]) => {
      const error = toTurboQuantError(`${this.#label}: initial allocation`, o) ??
        toTurboQuantError(`${this.#label}: initial allocation`, v);
      if (error) {
        for (const st of this.#layers) st.release();
        throw error;
      }
    });
  }

  /** Replaces the layer's buffers by ones of the grown capacity, copying the stored tokens. */
  async #grow(st: LayerStorage, needed: number): Promise<void> {
    const capacity = grownCapacity(needed, this.maxTokens);
    let next: Map<string, GPUBuffer> | null = null;
    try {
      await withErrorScopes(
        this.device,
        `${this.#label}: growing layer ${st.layer} to ${capacity} tokens`,
        () => {
          next = st.createBuffers(this.device, capacity);
          const encoder = this.device.createCommandEncoder({ label: `${this.#label}/grow` });
          st.encodeCopyTo(encoder, next, st.length);
          this.device.queue.submit([encoder.finish()]);
        },
      );
      this.#checkUsable("append");
    } catch (e) {
      for (const b of (next as Map<string, GPUBuffer> | null)?.values() ?? []) b.destroy();
      throw e;
    }
    // The copy is submitted: destroying the old buffers now is safe (the free is deferred).
    const old = st.install(next, capacity);
    if (old) { for (const b of old.values()) b.destroy(); }
  }

  async #appendLocked(layer: number, tokens: number, source: AppendSource): Promise<void> {
    this.#checkUsable("append");
    await this.#ready;
    const st = this.#layers[layer];
    const needed = st.length + tokens;
    if (needed > this.maxTokens) {
      throw new TurboQuantError(
        "out-of-memory",
        `append: layer ${layer} can hold at most ${this.maxTokens} tokens (maxBufferSize ` +
          `${this.bufferLimitBytes()} bytes); ${st.length} + ${tokens} = ${needed} do not fit`,
      );
    }
    // Jobs: each inside one binding window, each source within one binding.
    const window = this.windowTokens;
    const maxJob = this.#maxAppendJobTokens;
    const jobs: { start: number; tokens: number; offset: number }[] = [];
    for (let done = 0; done < tokens;) {
      const start = st.length + done;
      const windowEnd = (Math.floor(start / window) + 1) * window;
      const n = Math.min(tokens - done, windowEnd - start, maxJob);
      jobs.push({ start, tokens: n, offset: done });
      done += n;
    }
    if (source.kind === "gpu" && jobs.length > 1) {
      for (const [name, b] of [["kBuffer", source.k], ["vBuffer", source.v]] as const) {
        check(
          (b.usage & GPUBufferUsage.COPY_SRC) !== 0,
          `appendBuffers: ${name} (label "${b.label}") needs GPUBufferUsage.COPY_SRC: an append of ` +
            `${tokens} tokens at length ${st.length} is split at binding windows`,
        );
      }
    }
    const encode = await this.appendEncoder(layer);
    this.#checkUsable("append");
    if (needed > st.capacity) await this.#grow(st, needed);
    for (const job of jobs) {
      const ctx = new OperationContext(this.device, `${this.#label}/append`, this.#timings);
      try {
        await withErrorScopes(this.device, `append to layer ${layer}`, () => {
          const windowStart = Math.floor(job.start / window) * window;
          const w = st.window(windowStart, job.start + job.tokens - windowStart);
          encode(this.#appendJob(ctx, st, job, tokens, w, source));
          ctx.submit();
        });
      } finally {
        ctx.dispose();
      }
      await this.#recordTiming(ctx);
      this.#checkUsable("append");
    }
    st.length = needed;
  }

  #appendJob(
    ctx: OperationContext,
    st: LayerStorage,
    job: { start: number; tokens: number; offset: number },
    total: number,
    window: StorageWindow,
    source: AppendSource,
  ): AppendJob {
    const { device } = this;
    const heads = this.numKvHeads;
    const hd = this.headDim;
    const whole = job.tokens === total;
    let cpu: { k: Float32Array; v: Float32Array } | null = null;
    if (source.kind === "cpu") {
      if (whole) cpu = { k: source.k, v: source.v };
      else {
        const slice = (x: Float32Array): Float32Array => {
          const out = new Float32Array(heads * job.tokens * hd);
          for (let h = 0; h < heads; h++) {
            const from = (h * total + job.offset) * hd;
            out.set(x.subarray(from, from + job.tokens * hd), h * job.tokens * hd);
          }
          return out;
        };
        cpu = { k: slice(source.k), v: slice(source.v) };
      }
    }
    let gpu: { k: GPUBuffer; v: GPUBuffer } | null = null;
    const bytes = heads * job.tokens * hd * 4;
    if (source.kind === "gpu") {
      if (whole) gpu = { k: source.k, v: source.v };
      else {
        // Gather this job's token range of every head now, before the encoder opens a pass.
        const k = ctx.scratch("k-source", bytes);
        const v = ctx.scratch("v-source", bytes);
        const span = job.tokens * hd * 4;
        for (let h = 0; h < heads; h++) {
          const from = (h * total + job.offset) * hd * 4;
          ctx.encoder.copyBufferToBuffer(source.k, from, k, h * span, span);
          ctx.encoder.copyBufferToBuffer(source.v, from, v, h * span, span);
        }
        gpu = { k, v };
      }
    }
    const sources = (): { k: GPUBuffer; v: GPUBuffer } => {
      // CPU data is uploaded on first use (mapped at creation: no encoder commands).
      if (!gpu) {
        const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC;
        gpu = {
          k: ctx.scratch("k-source", bytes, usage, cpu!.k),
          v: ctx.scratch("v-source", bytes, usage, cpu!.v),
        };
      }
      return gpu;
    };
    return {
      device,
      layer: st.layer,
      storage: st,
      encoder: ctx.encoder,
      uniforms: ctx.uniforms,
      scratch: (l, s, u, d) => ctx.scratch(l, s, u, d),
      beginComputePass: (l) => ctx.beginComputePass(l),
      passTimestamps: () => ctx.passTimestamps(),
      start: job.start,
      tokens: job.tokens,
      window,
      get k(): GPUBuffer {
        return sources().k;
      },
      get v(): GPUBuffer {
        return sources().v;
      },
      cpu,
    };
  }

  async #attentionLocked(
    layer: number,
    numHeads: number,
    qTokens: number,
    options: AttentionOptions,
    q: { data: Float32Array } | { buffer: GPUBuffer; out?: GPUBuffer },
  ): Promise<{ out: GPUBuffer; read: PendingRead | null; timing: Promise<void> }> {
    this.#checkUsable("attention");
    await this.#ready;
    const st = this.#layers[layer];
    const qBytes = numHeads * qTokens * this.headDim * 4;
    this.#checkQTokens("attention", layer, qTokens, qBytes); // state may have changed
    const seqLen = st.length;
    const causal = options.causal ?? false;
    const encode = await this.attentionEncoder({ layer, seqLen, numHeads, qTokens, causal });
    this.#checkUsable("attention");
    const ctx = new OperationContext(this.device, `${this.#label}/attention`, this.#timings);
    let read: PendingRead | null = null;
    let out: GPUBuffer | null = null;
    let ownOut = false;
    try {
      await withErrorScopes(this.device, `attention on layer ${layer}`, () => {
        let qBuffer: GPUBuffer;
        if ("data" in q) {
          qBuffer = ctx.scratch("q", qBytes, GPUBufferUsage.STORAGE, q.data);
          out = ctx.scratch("out", qBytes, GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC);
        } else {
          qBuffer = q.buffer;
          if (q.out) out = q.out;
          else {
            out = this.device.createBuffer({
              label: `${this.#label}/attention-out`,
              size: qBytes,
              usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
            });
            ownOut = true;
          }
        }
        encode({
          device: this.device,
          layer,
          storage: st,
          encoder: ctx.encoder,
          uniforms: ctx.uniforms,
          scratch: (l, s, u, d) => ctx.scratch(l, s, u, d),
          beginComputePass: (l) => ctx.beginComputePass(l),
          passTimestamps: () => ctx.passTimestamps(),
          seqLen,
          numHeads,
          qTokens,
          groupSize: numHeads / this.numKvHeads,
          scale: options.scale ?? 1 / Math.sqrt(this.headDim),
          causal,
          q: qBuffer,
          out: out!,
          windows: st.windows(0, seqLen, this.windowTokens),
        });
        if ("data" in q) {
          read = encodeRead(
            this.device,
            ctx.encoder,
            out!,
            0,
            qBytes,
            `${this.#label}/attention-readback`,
          );
        }
        ctx.submit();
      });
    } catch (e) {
      (read as PendingRead | null)?.discard();
      if (ownOut) (out as GPUBuffer | null)?.destroy();
      throw e;
    } finally {
      ctx.dispose();
    }
    return { out: out!, read, timing: this.#recordTiming(ctx) };
  }

  async #dequantizeLocked(layer: number): Promise<DequantizedLayer> {
    this.#checkUsable("dequantize");
    await this.#ready;
    const st = this.#layers[layer];
    const seqLen = st.length;
    const hd = this.headDim;
    const heads = this.numKvHeads;
    const k = new Float32Array(heads * seqLen * hd);
    const v = new Float32Array(heads * seqLen * hd);
    if (seqLen === 0) return { k, v };
    const encode = await this.dequantizeEncoder(layer);
    // Windows whose f32 output also fits one binding.
    const outFit = Math.floor(this.bindingLimitBytes() / (heads * hd * 4));
    const maxTokens = Math.max(
      WINDOW_ALIGN_TOKENS,
      Math.min(this.windowTokens, Math.floor(outFit / WINDOW_ALIGN_TOKENS) * WINDOW_ALIGN_TOKENS),
    );
    for (const window of st.windows(0, seqLen, maxTokens)) {
      this.#checkUsable("dequantize");
      const ctx = new OperationContext(this.device, `${this.#label}/dequantize`, this.#timings);
      const bytes = heads * window.tokens * hd * 4;
      let reads: [PendingRead, PendingRead] | null = null;
      try {
        await withErrorScopes(this.device, `dequantize layer ${layer}`, () => {
          const kOut = ctx.scratch("k-out", bytes);
          const vOut = ctx.scratch("v-out", bytes);
          encode({
            device: this.device,
            layer,
            storage: st,
            encoder: ctx.encoder,
            uniforms: ctx.uniforms,
            scratch: (l, s, u, d) => ctx.scratch(l, s, u, d),
            beginComputePass: (l) => ctx.beginComputePass(l),
            passTimestamps: () => ctx.passTimestamps(),
            window,
            kOut,
            vOut,
          });
          reads = [
            encodeRead(this.device, ctx.encoder, kOut, 0, bytes),
            encodeRead(this.device, ctx.encoder, vOut, 0, bytes),
          ];
          ctx.submit();
        });
      } catch (e) {
        for (const r of (reads as [PendingRead, PendingRead] | null) ?? []) r.discard();
        throw e;
      } finally {
        ctx.dispose();
      }
      const [kw, vw] = await Promise.all(reads!.map((r: PendingRead) => r.read()));
      await this.#recordTiming(ctx);
      const kf = new Float32Array(kw);
      const vf = new Float32Array(vw);
      const span = window.tokens * hd;
      for (let h = 0; h < heads; h++) {
        const to = (h * seqLen + window.start) * hd;
        k.set(kf.subarray(h * span, (h + 1) * span), to);
        v.set(vf.subarray(h * span, (h + 1) * span), to);
      }
    }
    return { k, v };
  }

  async #recordTiming(ctx: OperationContext): Promise<void> {
    if (!this.#timings) return;
    const ms = await ctx.gpuMs();
    if (ms !== null) this.#lastGpuTimeMs = ms;
  }
}
