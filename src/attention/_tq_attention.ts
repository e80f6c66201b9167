/**
 * Host side of the fused TurboQuant attention: scores and values are computed straight from
 * the packed cache rows, never from a dequantized copy.
 *
 * Three passes per call: `tq_rotate_query` (queries into the keys' rotated domain, times the
 * scale; plus the QJL projection in prod key mode), `tq_attention` (split-K over chunks of
 * tokens, one partial per row, chunk and invocation, one dispatch per window of bound rows) and
 * `tq_attention_reduce` (merges the partials, rotates the output back to the values' original
 * domain). See shaders/tq_attention.wgsl for the kernel's design.
 *
 * @module
 */

import type { TurboQuantCodec } from "../codec/codec.ts";
import { check, TurboQuantError } from "../errors.ts";
import { createBuffer, rowWindow, STORAGE_USAGE } from "../gpu/_buffers.ts";
import { composeShader, getPipeline } from "../gpu/_pipelines.ts";
import { uniformLayout } from "../gpu/_uniforms.ts";
import { TQ_COMMON_WGSL } from "../_shaders/_tq_common.ts";
import { TQ_ATTENTION_WGSL } from "../_shaders/tq_attention.ts";
import { TQ_ATTENTION_REDUCE_WGSL } from "../_shaders/tq_attention_reduce.ts";
import { TQ_ROTATE_QUERY_WGSL } from "../_shaders/tq_rotate_query.ts";

/** The cache buffers of one layer, token-major (see the storage layout in DESIGN.md). */
export interface TqAttentionRows {
  kIndex: GPUBuffer;
  kScales: GPUBuffer;
  vIndex: GPUBuffer;
  vScales: GPUBuffer;
  /** prod key mode: QJL sign rows. */
  kSigns?: GPUBuffer;
  /** prod key mode: f16 residual norm rows. */
  kNorms?: GPUBuffer;
}

/** Options of one attention call. */
export interface TqAttentionCall {
  /** Query heads: a multiple of the KV heads. */
  numHeads: number;
  /** Query tokens: the last qTokens positions of the cache. */
  qTokens: number;
  /** Score scale (usually 1 / sqrt(headDim)). */
  scale: number;
  /** Query i sees positions 0 .. seqLen - qTokens + i when true, all seqLen otherwise. */
  causal: boolean;
  /** Benchmarks: timestamp writes for each compute pass (a GpuTimer fits). */
  timer?: { passTimestamps(): GPUComputePassTimestampWrites | undefined };
}

/**
 * Where `record` may put its commands instead of a bare encoder: a cache job of the library's
 * framework fits (passes begun through it get its timestamps; its scratch buffers live until
 * the commands are submitted, so nothing is left for `releaseTransient`).
 */
export interface TqRecorder {
  /** The encoder the commands go to. */
  readonly encoder: GPUCommandEncoder;
  /** Begins a labelled compute pass. */
  beginComputePass(label: string): GPUComputePassEncoder;
  /** A buffer that lives until the commands are submitted. */
  scratch?(label: string, size: number, usage?: number, data?: ArrayBufferView): GPUBuffer;
}

/** Tuning and testing knobs of {@linkcode TurboQuantAttention.create}. */
export interface TqAttentionOptions {
  /** Query heads per KV head to specialise a pipeline for (compiled with the generic one). */
  group?: number;
  /** Largest bound range of rows in bytes (default: the binding limit, at most 128 MiB). */
  maxWindowBytes?: number;
  /** Largest partials scratch per row group in bytes (default 64 MiB). */
  maxPartialBytes?: number;
  /** Centroids of 3- and 4-bit codebooks from an odd polynomial, not a select tree (default true). */
  polynomial?: boolean;
  /** Blocks per unit of the head dimension, rounded to a power of two (default 2). */
  unitBlocks?: number;
  /** Most tokens per invocation (default 256; 32 for compact kernels): sizes its score array. */
  tokensPerLane?: number;
  /** Workgroups one call aims for (default: 32 on a software adapter, 4096 elsewhere). */
  targetWorkgroups?: number;
  /** Largest chunk in tokens (default: what Mesa's loop budget allows). */
  maxChunkTokens?: number;
  /**
   * Expand the kernel's marked loops (default: true, except on a software adapter without
   * shader-f16, taken for the GL backend, whose GLSL compiler is too slow for it).
   */
  unroll?: boolean;
}

/** Invocations per workgroup of the main kernel: llvmpipe's SIMD width on AVX2. */
const LANES = 8;
/** Mesa's budget of loop iterations per invocation (all loops together). */
const LOOP_BUDGET = 65535;
/** Headroom kept below the budget. */
const LOOP_HEADROOM = 2048;
/**
 * Most chunks per row: the reduce pass loops once over their LANES partials each, inside Mesa's
 * loop budget (with room for its block transform).
 */
const MAX_SLOTS = Math.floor((LOOP_BUDGET - 4096) / LANES);
const REDUCE_WG = 64;
/** vec4s of a 64 KiB uniform buffer binding (the WebGPU default limit). */
const UBO_VEC4 = 4096;

const MAIN_PARAMS = uniformLayout({
  seq_len: "u32",
  q_tokens: "u32",
  causal: "u32",
  group: "u32",
  window_start: "u32",
  window_tokens: "u32",
  chunk_tokens: "u32",
  slot_base: "u32",
  num_slots: "u32",
  rows: "u32",
  row_base: "u32",
  k_off: "u32",
  ks_off: "u32",
  v_off: "u32",
  vs_off: "u32",
  sg_off: "u32",
  nm_off: "u32",
  q_off: "u32",
  sq_off: "u32",
  one: "u32",
});
const REDUCE_PARAMS = uniformLayout({
  num_slots: "u32",
  rows: "u32",
  row_base: "u32",
  group: "u32",
  q_tokens: "u32",
  total: "u32",
  groups_x: "u32",
});
const ROTATE_PARAMS = uniformLayout({
  rows: "u32",
  groups_x: "u32",
  sq_base: "u32",
  scale: "f32",
  group: "u32",
  kv_heads: "u32",
  q_tokens: "u32",
});

/** A WGSL f32 literal that parses back to exactly `x` (an f32 value). */
function f32Literal(x: number): string {
  if (!Number.isFinite(x)) throw new TurboQuantError("invalid-argument", `non-finite ${x}`);
  const s = String(x);
  return /[.e]/.test(s) ? `${s}f` : `${s}.0f`;
}

/** Words per row load: 4, 2 or 1, the widest that divides the row. */
function vecWidth(words: number): number {
  return words % 4 === 0 ? 4 : words % 2 === 0 ? 2 : 1;
}

/**
 * WGSL for the row load type of one codec (`alias <name>Vec`, `fn <name>vec_at`) and its
 * centroid lookup `fn <name>val(c: u32) -> f32`: a select tree over the literal centroids up to
 * 4 bits (no memory access at all), a private table beyond.
 */
function codecHelpers(
  prefix: "k" | "v",
  words: number,
  centroids: Float32Array,
  polynomial: boolean,
): string {
  const P = prefix.toUpperCase();
  const width = vecWidth(words);
  const lines: string[] = [];
  if (width === 1) {
    lines.push(`alias ${P}Vec = u32;`);
    lines.push(`fn ${prefix}vec_at(v: ${P}Vec, c: u32) -> u32 { return v; }`);
  } else {
    lines.push(`alias ${P}Vec = vec${width}<u32>;`);
    lines.push(`fn ${prefix}vec_at(v: ${P}Vec, c: u32) -> u32 { return v[c]; }`);
  }
  const levels = centroids.length;
  const bits = Math.log2(levels);
  const poly = polynomial && bits >= 3 && bits <= 4 ? oddPolynomial(centroids) : null;
  if (poly) {
    // c(code) = x * P(x^2) with x = code - (levels - 1) / 2: the odd interpolating polynomial
    // through the (symmetric) centroids, 11 operations at 4 bits where a select tree takes 22.
    lines.push(`fn ${prefix}val(c: u32) -> f32 {`);
    lines.push(`  let x = f32(c) - ${f32Literal((levels - 1) / 2)};`, `  let x2 = x * x;`);
    lines.push(`  var p = ${f32Literal(poly[poly.length - 1])};`);
    for (let k = poly.length - 2; k >= 0; k--) {
      lines.push(`  p = fma(p, x2, ${f32Literal(poly[k])});`);
    }
    lines.push(`  return p * x;`, `}`);
  } else if (bits <= 4) {
    lines.push(`fn ${prefix}val(c: u32) -> f32 {`);
    let names = Array.from(centroids, (x) => f32Literal(x));
    for (let b = 0; b < bits; b++) {
      lines.push(`  let b${b} = (c & ${1 << b}u) != 0u;`);
      const next: string[] = [];
      for (let i = 0; i < names.length; i += 2) {
        const name = `t${b}_${i / 2}`;
        lines.push(`  let ${name} = select(${names[i]}, ${names[i + 1]}, b${b});`);
        next.push(name);
      }
      names = next;
    }
    lines.push(`  return ${names[0]};`, `}`);
  } else {
    lines.push(
      `var<private> ${P}CT: array<f32, ${levels}> = array<f32, ${levels}>(${
        Array.from(centroids, (x) => f32Literal(x)).join(", ")
      });`,
    );
    lines.push(`fn ${prefix}val(c: u32) -> f32 { return ${P}CT[c]; }`);
  }
  return lines.join("\n");
}

/**
 * The f32 coefficients a_k of the odd polynomial x * sum_k a_k x^(2k) through the centroids at
 * x = code - (levels - 1) / 2, when it reproduces every centroid to within 2.5e-7 relative in
 * f32 arithmetic (fma steps, as the kernel evaluates it); null when the centroids are not
 * symmetric or the fit is not that close.
 */
export function oddPolynomial(centroids: Float32Array): Float32Array | null {
  const L = centroids.length;
  const n = L / 2;
  for (let j = 0; j < n; j++) if (centroids[j] !== -centroids[L - 1 - j]) return null;
  // Solve sum_k a_k x_m^(2k+1) = c(half + m) in f64 (Gauss-Jordan, partial pivoting).
  const M = Array.from({ length: n }, (_, m) => {
    const x = m + 0.5;
    return [...Array.from({ length: n }, (_, k) => x ** (2 * k + 1)), centroids[n + m]];
  });
  for (let i = 0; i < n; i++) {
    let p = i;
    for (let r = i + 1; r < n; r++) if (Math.abs(M[r][i]) > Math.abs(M[p][i])) p = r;
    [M[i], M[p]] = [M[p], M[i]];
    for (let r = 0; r < n; r++) {
      if (r === i) continue;
      const f = M[r][i] / M[i][i];
      for (let k = i; k <= n; k++) M[r][k] -= f * M[i][k];
    }
  }
  const a = Float32Array.from(M, (row, i) => row[n] / row[i]);
  const fr = Math.fround;
  for (let j = 0; j < L; j++) {
    const x = fr(j - (L - 1) / 2);
    const x2 = fr(x * x);
    let p = a[n - 1];
    for (let k = n - 2; k >= 0; k--) p = fr(p * x2 + a[k]);
    const v = fr(p * x);
    if (!(Math.abs(v - centroids[j]) <= 2.5e-7 * Math.abs(centroids[j]))) return null;
  }
  return a;
}

/**
 * Expands every loop written `for (var i = 0u; i < BOUND; i++) { // unroll` into copies of its
 * body, each opening with `let i = <k>u;`. BOUND is a product or quotient of the constants in
 * `values` and integer literals. Mesa unrolls only small loops by itself; these expansions make
 * every index into the kernel's private arrays a constant, so the arrays live in registers
 * instead of per-lane memory, and they take nothing from Mesa's loop budget.
 */
export function unrollMarkedLoops(code: string, values: Record<string, number>): string {
  const marker = /for \(var (\w+) = 0u; \1 < ([^;]+); \1\+\+\) \{ \/\/ unroll\n/;
  let out = code;
  for (;;) {
    const m = marker.exec(out);
    if (!m) return out;
    const open = m.index + m[0].length;
    let depth = 1;
    let i = open;
    for (; i < out.length && depth > 0; i++) {
      if (out[i] === "{") depth++;
      else if (out[i] === "}") depth--;
    }
    if (depth !== 0) throw new TurboQuantError("invalid-state", `unroll: unbalanced loop ${m[0]}`);
    const body = out.slice(open, i - 1);
    const n = evalBound(m[2], values);
    const copies: string[] = [];
    for (let k = 0; k < n; k++) copies.push(`{ let ${m[1]} = ${k}u;\n${body}}`);
    out = out.slice(0, m.index) + copies.join("\n") + out.slice(i);
  }
}

/**
 * The opposite of {@linkcode unrollMarkedLoops}: multiplies the bound of every marked loop by
 * `one` (a uniform that is always 1), so that no compiler can unroll them. For the GL backend,
 * where Mesa's GLSL compiler would unroll the constant loops itself and take minutes.
 */
export function keepMarkedLoops(code: string, one: string): string {
  return code.replace(
    /for \(var (\w+) = 0u; \1 < ([^;]+); \1\+\+\) \{ \/\/ unroll\n/g,
    (_m, v: string, bound: string) => `for (var ${v} = 0u; ${v} < (${bound}) * ${one}; ${v}++) {\n`,
  );
}

function evalBound(expr: string, values: Record<string, number>): number {
  const parts = expr.trim().split(/\s*([*/])\s*/);
  const value = (t: string): number => {
    const v = /^\d+u?$/.test(t) ? parseInt(t, 10) : values[t];
    if (v === undefined || !Number.isInteger(v)) {
      throw new TurboQuantError("invalid-state", `unroll: unknown bound ${t} in ${expr}`);
    }
    return v;
  };
  let acc = value(parts[0]);
  for (let i = 1; i < parts.length; i += 2) {
    acc = parts[i] === "*" ? acc * value(parts[i + 1]) : Math.floor(acc / value(parts[i + 1]));
  }
  return acc;
}

/** The shape of one tq_attention pipeline, as its loop counts depend on it. */
interface KernelShape {
  headDim: number;
  blockSize: number;
  rows: number;
  /** Blocks per unit. */
  sb: number;
  /** Most tokens per invocation. */
  tl: number;
  kLoads: number;
  kVec: number;
  vLoads: number;
  vVec: number;
  prod: boolean;
  /** Marked loops expanded by the host (else every loop is counted). */
  unrolled: boolean;
}

/**
 * The most loop iterations one tq_attention invocation runs for a chunk of `chunk` tokens,
 * mirroring the kernel's loop nests. With `unrolled`, only the loops left in the code count;
 * without, every loop counts as if Mesa unrolled none.
 */
export function loopIterations(k: KernelShape, chunk: number): number {
  const { headDim: d, blockSize: B, rows: R, sb, prod } = k;
  const units = d / B / sb;
  const unit = sb * B;
  const steps = Math.ceil(chunk / LANES);
  if (k.unrolled) return 2 * units * (1 + steps) + 2 * steps + R * LANES;
  const kStep = 1 + k.kLoads * (1 + k.kVec) + R + sb + sb * (1 + R + B * (1 + R) + R) +
    (prod ? Math.ceil(unit / 32) + R * (1 + unit) : 0) + R;
  const kUnit = 1 + R * (1 + unit / 4) * (prod ? 2 : 1) + steps * kStep;
  const softmax = R + steps * (1 + R) + R + R * (1 + LANES) + R + steps * (1 + R);
  const vStep = 1 + k.vLoads * (1 + k.vVec) + R + sb + sb * (1 + R + B * (1 + R));
  const vUnit = 1 + R * unit + steps * vStep + R * (1 + unit / 4);
  return R + units * (kUnit + vUnit) + softmax;
}

/** The binding and loads of the rotated queries (QR) and their projections (SQ). */
function queryBindings(uniform: boolean): string {
  const decl = (binding: number, name: string) =>
    uniform
      ? `@group(0) @binding(${binding}) var<uniform> ${name}: array<vec4<f32>, ${UBO_VEC4}>;`
      : `@group(0) @binding(${binding}) var<storage, read> ${name}: array<vec4<f32>>;`;
  return [
    decl(5, "QR"),
    decl(9, "SQ"),
    "fn q4(i: u32) -> vec4<f32> { return QR[i]; }",
    "fn sq4(i: u32) -> vec4<f32> { return SQ[i]; }",
  ].join("\n");
}

interface MainPipeline {
  rows: number;
  shape: KernelShape;
  /** Queries come from a uniform buffer: a dispatch's rows must fit 64 KiB. */
  uniformQueries: boolean;
  pipeline: GPUComputePipeline;
}

/** What one `record` call does (see `plan`). */
export interface TqAttentionPlan {
  /** Query rows per workgroup. */
  rows: number;
  /** Tokens per chunk (one workgroup, one partial). */
  chunkTokens: number;
  /** Partial slots per row. */
  slots: number;
  /** Rows per row group (per KV head), each group one set of dispatches plus a reduce. */
  groupRows: number;
  /** Tokens per bound window of rows. */
  windowTokens: number;
}

/**
 * Fused attention over a TurboQuant cache for one (key codec, value codec, KV heads) setting.
 * Pipelines come from the per-device cache, so one object per layer costs nothing extra.
 */
export class TurboQuantAttention {
  readonly device: GPUDevice;
  readonly keyCodec: TurboQuantCodec;
  readonly valueCodec: TurboQuantCodec;
  readonly numKvHeads: number;
  readonly #mains: MainPipeline[];
  readonly #rotate: GPUComputePipeline;
  readonly #sketch: GPUComputePipeline | undefined;
  readonly #reduce: GPUComputePipeline;
  readonly #tables: GPUBuffer; // key signs [d], value signs [d] at #vSignsOffset
  readonly #vSignsOffset: number;
  readonly #qjl: GPUBuffer | undefined;
  readonly #maxWindowBytes: number;
  readonly #maxPartialBytes: number;
  readonly #maxChunk: number;
  readonly #targetWorkgroups: number;
  #qr: GPUBuffer | null = null;
  #part: GPUBuffer | null = null;
  #transient: GPUBuffer[] = [];

  private constructor(
    device: GPUDevice,
    keyCodec: TurboQuantCodec,
    valueCodec: TurboQuantCodec,
    numKvHeads: number,
    mains: MainPipeline[],
    rotate: GPUComputePipeline,
    sketch: GPUComputePipeline | undefined,
    reduce: GPUComputePipeline,
    options: TqAttentionOptions,
    software: boolean,
  ) {
    this.device = device;
    this.keyCodec = keyCodec;
    this.valueCodec = valueCodec;
    this.numKvHeads = numKvHeads;
    this.#mains = mains;
    this.#rotate = rotate;
    this.#sketch = sketch;
    this.#reduce = reduce;
    const d = keyCodec.headDim;
    this.#vSignsOffset = roundUp(d * 4, 256);
    const tables = new Float32Array(this.#vSignsOffset / 4 + d);
    tables.set(keyCodec.signs, 0);
    tables.set(valueCodec.signs, this.#vSignsOffset / 4);
    this.#tables = createBuffer(
      device,
      "turboquant/tq-attention-tables",
      tables.byteLength,
      GPUBufferUsage.STORAGE,
      tables,
    );
    this.#qjl = keyCodec.qjlMatrix
      ? createBuffer(
        device,
        "turboquant/tq-attention-qjl",
        keyCodec.qjlMatrix.byteLength,
        GPUBufferUsage.STORAGE,
        keyCodec.qjlMatrix,
      )
      : undefined;
    const limit = Math.min(device.limits.maxStorageBufferBindingSize, 1 << 27);
    this.#maxWindowBytes = Math.min(options.maxWindowBytes ?? limit, limit);
    this.#maxPartialBytes = Math.min(options.maxPartialBytes ?? 1 << 26, limit);
    // The largest chunk (a multiple of 64 tokens) whose invocations stay inside the budget.
    let maxChunk = Math.min(options.maxChunkTokens ?? 1 << 16, LANES * mains[0].shape.tl);
    maxChunk = Math.max(64, Math.floor(maxChunk / 64) * 64);
    const fits = (c: number) =>
      mains.every((m) => loopIterations(m.shape, c) <= LOOP_BUDGET - LOOP_HEADROOM);
    while (maxChunk > 64 && !fits(maxChunk)) maxChunk -= 64;
    if (!fits(maxChunk)) {
      throw new TurboQuantError(
        "invalid-argument",
        `TurboQuantAttention: 64 tokens per workgroup exceed Mesa's loop budget for this shape`,
      );
    }
    this.#maxChunk = maxChunk;
    this.#targetWorkgroups = options.targetWorkgroups ?? (software ? 32 : 4096);
  }

  /** Compiles (or takes from the per-device cache) the pipelines and uploads the tables. */
  static async create(
    device: GPUDevice,
    keyCodec: TurboQuantCodec,
    valueCodec: TurboQuantCodec,
    numKvHeads: number,
    options: TqAttentionOptions = {},
  ): Promise<TurboQuantAttention> {
    const d = keyCodec.headDim;
    check(
      valueCodec.headDim === d && valueCodec.blockSize === keyCodec.blockSize,
      `TurboQuantAttention: key and value codecs differ in headDim or blockSize`,
    );
    check(
      d % 8 === 0 && d <= 256,
      `TurboQuantAttention: headDim ${d} is not a multiple of 8 <= 256`,
    );
    check(valueCodec.mode === "mse", `TurboQuantAttention: prod mode is for keys only`);
    check(
      Number.isInteger(numKvHeads) && numKvHeads >= 1,
      `TurboQuantAttention: numKvHeads ${numKvHeads} is not a positive integer`,
    );
    const info = (device as { adapterInfo?: GPUAdapterInfo }).adapterInfo;
    const software = !info ||
      (info as { isFallbackAdapter?: boolean }).isFallbackAdapter === true ||
      /llvmpipe|lavapipe|swiftshader|software/i.test(`${info.description} ${info.device}`);
    // Fully unrolled kernels are what make llvmpipe fast, but Mesa's GLSL compiler takes
    // minutes over them: a software adapter without shader-f16 is taken for the GL backend.
    const unrolled = options.unroll ?? (!software || device.features.has("shader-f16"));
    const tl = options.tokensPerLane ?? (unrolled ? 256 : 32);
    check(
      Number.isInteger(tl) && tl >= 8 && tl <= 4096 && tl % 8 === 0,
      `TurboQuantAttention: tokensPerLane ${tl} is not a multiple of 8 from 8 to 4096`,
    );
    // Units: the fewest whole blocks whose codes fill whole words for both codecs (at least
    // unitBlocks blocks: bigger units load wider and compile longer).
    const nb = keyCodec.numBlocks;
    let sb = 1;
    while (sb < (options.unitBlocks ?? 2) && nb % (2 * sb) === 0) sb *= 2;
    const whole = (bits: number) => (sb * keyCodec.blockSize * bits) % 32 === 0;
    while (
      sb < nb && nb % (2 * sb) === 0 && !(whole(keyCodec.codeBits) && whole(valueCodec.codeBits))
    ) {
      sb *= 2;
    }
    if (!(whole(keyCodec.codeBits) && whole(valueCodec.codeBits))) sb = nb; // one unit per row
    const kUW = sb === nb
      ? keyCodec.wordsPerVector
      : (sb * keyCodec.blockSize * keyCodec.codeBits) / 32;
    const vUW = sb === nb
      ? valueCodec.wordsPerVector
      : (sb * keyCodec.blockSize * valueCodec.codeBits) / 32;
    const prod = keyCodec.mode === "prod";
    const rmax = Math.max(1, Math.min(8, Math.floor(1024 / d)));
    const rowCounts = new Set([Math.min(4, rmax)]);
    if (options.group !== undefined) {
      check(
        Number.isInteger(options.group) && options.group >= 1,
        `TurboQuantAttention: group ${options.group} is not a positive integer`,
      );
      rowCounts.add(Math.min(options.group, rmax));
    }
    const shared = {
      HEAD_DIM: d,
      BLOCK: keyCodec.blockSize,
      NUM_BLOCKS: keyCodec.numBlocks,
      FWHT_SCALE: Math.fround(1 / Math.sqrt(keyCodec.blockSize)),
      // _tq_common.wgsl's code_at needs these; these passes never call it.
      CODE_BITS: valueCodec.codeBits,
      LEVELS: 1 << valueCodec.codeBits,
    };
    const helpers = codecHelpers("k", kUW, keyCodec.centroids, options.polynomial ?? true) + "\n" +
      codecHelpers("v", vUW, valueCodec.centroids, options.polynomial ?? true);
    const mainFor = async (rows: number): Promise<MainPipeline> => {
      const constants = {
        ...shared,
        ROWS: rows,
        KV_HEADS: numKvHeads,
        K_BITS: keyCodec.codeBits,
        V_BITS: valueCodec.codeBits,
        K_WORDS: keyCodec.wordsPerVector,
        V_WORDS: valueCodec.wordsPerVector,
        K_SCALE_WORDS: Math.ceil((numKvHeads * keyCodec.numBlocks) / 2),
        V_SCALE_WORDS: Math.ceil((numKvHeads * valueCodec.numBlocks) / 2),
        SB: sb,
        K_UW: kUW,
        V_UW: vUW,
        K_VEC: vecWidth(kUW),
        V_VEC: vecWidth(vUW),
        PROD: prod,
        SIGN_WORDS: Math.ceil(d / 32), // the sign words (a stand-in size in mse mode)
        NORM_WORDS: Math.ceil(numKvHeads / 2),
        LANES,
        TL: tl,
      };
      const derived = {
        HEAD_DIM4: d / 4,
        UNIT: sb * keyCodec.blockSize,
        UNIT4: (sb * keyCodec.blockSize) / 4,
        NUNITS: nb / sb,
        K_UL: kUW / vecWidth(kUW),
        V_UL: vUW / vecWidth(vUW),
        SIGN_UW: Math.ceil((sb * keyCodec.blockSize) / 32),
      };
      // A row batch must fit one uniform window with room for its offset.
      const uniformQueries = rows * numKvHeads * (d / 4) <= UBO_VEC4 - 16;
      const kernel = unrolled
        ? unrollMarkedLoops(TQ_ATTENTION_WGSL, {
          ...(constants as unknown as Record<string, number>),
          ...derived,
        })
        : keepMarkedLoops(TQ_ATTENTION_WGSL, "P.one");
      const code = composeShader(
        constants,
        [
          helpers,
          queryBindings(uniformQueries),
        ]
          .join("\n"),
        kernel,
      );
      const pipeline = await getPipeline(device, { label: "turboquant/tq-attention", code });
      const shape: KernelShape = {
        headDim: d,
        blockSize: keyCodec.blockSize,
        rows,
        sb,
        tl,
        kLoads: derived.K_UL,
        kVec: constants.K_VEC,
        vLoads: derived.V_UL,
        vVec: constants.V_VEC,
        prod,
        unrolled,
      };
      return { rows, shape, uniformQueries, pipeline };
    };
    const rotateCode = composeShader(
      { ...shared, QJL_SCALE: Math.sqrt(Math.PI / 2) / d },
      TQ_COMMON_WGSL,
      TQ_ROTATE_QUERY_WGSL,
    );
    const [mains, rotate, sketch, reduce] = await Promise.all([
      Promise.all([...rowCounts].map(mainFor)),
      getPipeline(device, { label: "turboquant/tq-rotate-query", code: rotateCode }),
      prod
        ? getPipeline(device, {
          label: "turboquant/tq-rotate-query",
          entryPoint: "sketch",
          code: rotateCode,
        })
        : undefined,
      getPipeline(device, {
        label: "turboquant/tq-attention-reduce",
        code: composeShader(
          { ...shared, WG: REDUCE_WG },
          TQ_COMMON_WGSL,
          TQ_ATTENTION_REDUCE_WGSL,
        ),
      }),
    ]);
    mains.sort((a, b) => a.rows - b.rows);
    return new TurboQuantAttention(
      device,
      keyCodec,
      valueCodec,
      numKvHeads,
      mains,
      rotate,
      sketch,
      reduce,
      options,
      software,
    );
  }

  /** How `record` would split a call: rows per workgroup, chunks, row groups, windows. */
  plan(seqLen: number, numHeads: number, qTokens: number): TqAttentionPlan {
    const H = this.numKvHeads;
    const d = this.keyCodec.headDim;
    const group = numHeads / H;
    const main = this.#pick(group, qTokens);
    const R = main.rows;
    const rowsPerKv = group * qTokens;
    const batches = Math.ceil(rowsPerKv / R);
    // Bound windows of rows: whole multiples of 64 tokens (so every range starts 256-byte
    // aligned and the vector loads stay aligned).
    const prod = this.keyCodec.mode === "prod";
    const rowWords = [
      H * this.keyCodec.wordsPerVector,
      Math.ceil((H * this.keyCodec.numBlocks) / 2),
      H * this.valueCodec.wordsPerVector,
      Math.ceil((H * this.valueCodec.numBlocks) / 2),
      prod ? H * this.keyCodec.signWordsPerVector : 0,
      prod ? Math.ceil(H / 2) : 0,
    ];
    const maxRowBytes = 4 * Math.max(...rowWords);
    const windowCap = Math.floor(this.#maxWindowBytes / maxRowBytes / 64) * 64;
    check(windowCap >= 64, `attention: 64 tokens of rows exceed the binding limit`);
    // Chunks: enough workgroups to fill the machine, as few as that allows (every workgroup
    // pays for loading its queries and merging its lanes).
    const chunksPerHead = Math.max(1, Math.ceil(this.#targetWorkgroups / (H * batches)));
    let chunk = roundUp(Math.ceil(seqLen / chunksPerHead), 64);
    chunk = Math.max(64, Math.min(chunk, this.#maxChunk, windowCap));
    const slots = Math.ceil(seqLen / chunk);
    check(slots <= MAX_SLOTS, `attention: seqLen ${seqLen} exceeds ${MAX_SLOTS * chunk} tokens`);
    const windowTokens = Math.floor(windowCap / chunk) * chunk;
    // Row groups: partials within the scratch limit, queries within one uniform window.
    const slotBytes = LANES * (d + 4) * 4;
    let groupRows = Math.floor(this.#maxPartialBytes / (H * slots * slotBytes));
    if (main.uniformQueries) {
      groupRows = Math.min(groupRows, Math.floor((UBO_VEC4 - 16) / (H * (d / 4))));
    }
    groupRows = Math.max(R, Math.floor(groupRows / R) * R);
    groupRows = Math.min(groupRows, batches * R, 65535 * R);
    return { rows: R, chunkTokens: chunk, slots, groupRows, windowTokens };
  }

  /**
   * Records attention of `q` ([numHeads][qTokens][headDim] f32) over the first `seqLen` tokens
   * of `rows` into `out` (same shape). Call `releaseTransient()` once the work was submitted.
   */
  record(
    target: GPUCommandEncoder | TqRecorder,
    rows: TqAttentionRows,
    seqLen: number,
    q: GPUBuffer,
    out: GPUBuffer,
    o: TqAttentionCall,
  ): void {
    const d = this.keyCodec.headDim;
    const H = this.numKvHeads;
    const { numHeads, qTokens, scale, causal } = o;
    check(
      Number.isInteger(numHeads) && numHeads >= H && numHeads % H === 0,
      `attention: numHeads ${numHeads} is not a multiple of numKvHeads ${H}`,
    );
    check(
      Number.isInteger(qTokens) && qTokens >= 1 && Number.isInteger(seqLen) && seqLen >= qTokens,
      `attention: need 1 <= qTokens (${qTokens}) <= seqLen (${seqLen})`,
    );
    check(Number.isFinite(scale), `attention: scale ${scale} is not finite`);
    const prod = this.keyCodec.mode === "prod";
    check(
      !prod || (rows.kSigns !== undefined && rows.kNorms !== undefined),
      `attention: prod key mode needs rows.kSigns and rows.kNorms`,
    );
    const qBytes = numHeads * qTokens * d * 4;
    check(
      q.size >= qBytes && out.size >= qBytes,
      `attention: q or out smaller than ${qBytes} bytes`,
    );
    const group = numHeads / H;
    const main = this.#pick(group, qTokens);
    const plan = this.plan(seqLen, numHeads, qTokens);
    const { chunkTokens: chunk, slots: numSlots, groupRows, windowTokens } = plan;
    const R = main.rows;
    const rowsPerKv = group * qTokens;
    const slotBytes = LANES * (d + 4) * 4;
    const partBytes = H * Math.min(groupRows, rowsPerKv) * numSlots * slotBytes;
    // QR: rotated queries, then (prod) their projections, each followed by room for a full
    // uniform window.
    const qrRegion = roundUp(qBytes, 256) + UBO_VEC4 * 16;
    const qr = this.#scratch("qr", (prod ? 2 : 1) * qrRegion);
    const part = this.#scratch("part", partBytes);
    const uniforms = new Uniforms(this.device);
    const jobs: (() => void)[] = [];
    const timer = o.timer;
    const encoder: Passes = "encoder" in target
      ? { begin: (label) => target.beginComputePass(label) }
      : { begin: (label, t) => target.beginComputePass({ label, timestampWrites: t }) };

    // Pass 1: rotate (and project) the queries.
    const qRows = numHeads * qTokens;
    const rotateParams = (groupsX: number) =>
      ROTATE_PARAMS.pack({
        rows: qRows,
        groups_x: groupsX,
        sq_base: qrRegion / 4,
        scale,
        group,
        kv_heads: H,
        q_tokens: qTokens,
      });
    {
      const [gx, gy] = grid2(Math.ceil((qRows * this.keyCodec.numBlocks) / 64), this.device);
      const slot = uniforms.add(rotateParams(gx));
      jobs.push(() =>
        this.#dispatch(
          encoder,
          timer,
          this.#rotate,
          [
            uniforms.binding(slot),
            { buffer: q, size: qBytes },
            { buffer: this.#tables, size: d * 4 },
            { buffer: qr },
          ],
          gx,
          gy,
        )
      );
      if (prod) {
        const [sx, sy] = grid2(Math.ceil((qRows * d) / 64), this.device);
        const s2 = uniforms.add(rotateParams(sx));
        jobs.push(() =>
          this.#dispatch(
            encoder,
            timer,
            this.#sketch!,
            [
              uniforms.binding(s2),
              null,
              { buffer: this.#qjl! },
              { buffer: qr },
            ],
            sx,
            sy,
          )
        );
      }
    }

    const kw = H * this.keyCodec.wordsPerVector;
    const ksw = Math.ceil((H * this.keyCodec.numBlocks) / 2);
    const vw = H * this.valueCodec.wordsPerVector;
    const vsw = Math.ceil((H * this.valueCodec.numBlocks) / 2);
    const sgw = prod ? H * this.keyCodec.signWordsPerVector : 0;
    const nmw = prod ? Math.ceil(H / 2) : 0;
    const kVec = vecWidth(this.keyCodec.wordsPerVector);
    const vVec = vecWidth(this.valueCodec.wordsPerVector);
    const qAlign = main.uniformQueries
      ? this.device.limits.minUniformBufferOffsetAlignment
      : this.device.limits.minStorageBufferOffsetAlignment;
    const queryWindow = (region: number, row0: number, gRows: number) => {
      const start = region + row0 * H * d * 4;
      const offset = start - (start % qAlign);
      const size = main.uniformQueries ? UBO_VEC4 * 16 : start + gRows * H * d * 4 - offset;
      return { binding: { buffer: qr, offset, size }, vec4Offset: (start - offset) / 16 };
    };

    for (let row0 = 0; row0 < rowsPerKv; row0 += groupRows) {
      const gRows = Math.min(groupRows, rowsPerKv - row0);
      const batches = Math.ceil(gRows / R);
      const Q = queryWindow(0, row0, gRows);
      const SQ = prod ? queryWindow(qrRegion, row0, gRows) : Q;
      for (let w0 = 0; w0 < seqLen; w0 += windowTokens) {
        const wn = Math.min(windowTokens, seqLen - w0);
        const win = (buffer: GPUBuffer, words: number) =>
          rowWindow(this.device, buffer, words, w0, wn);
        const K = win(rows.kIndex, kw);
        const KS = win(rows.kScales, ksw);
        const V = win(rows.vIndex, vw);
        const VS = win(rows.vScales, vsw);
        const SG = prod ? win(rows.kSigns!, sgw) : KS;
        const NM = prod ? win(rows.kNorms!, nmw) : KS;
        if (K.wordOffset % kVec !== 0 || V.wordOffset % vVec !== 0) {
          throw new TurboQuantError("invalid-state", "attention: misaligned row window");
        }
        const slot = uniforms.add(MAIN_PARAMS.pack({
          seq_len: seqLen,
          q_tokens: qTokens,
          causal: causal ? 1 : 0,
          group,
          window_start: w0,
          window_tokens: wn,
          chunk_tokens: chunk,
          slot_base: w0 / chunk,
          num_slots: numSlots,
          rows: gRows,
          row_base: row0,
          k_off: K.wordOffset / kVec,
          ks_off: KS.wordOffset,
          v_off: V.wordOffset / vVec,
          vs_off: VS.wordOffset,
          sg_off: SG.wordOffset,
          nm_off: NM.wordOffset,
          q_off: Q.vec4Offset,
          sq_off: SQ.vec4Offset,
          one: 1,
        }));
        jobs.push(() =>
          this.#dispatch(
            encoder,
            timer,
            main.pipeline,
            [
              uniforms.binding(slot),
              K.binding,
              KS.binding,
              V.binding,
              VS.binding,
              Q.binding,
              { buffer: part, size: partBytes },
              SG.binding,
              NM.binding,
              SQ.binding,
            ],
            H,
            Math.ceil(wn / chunk),
            batches,
          )
        );
      }
      const total = H * gRows;
      const [rx, ry] = grid2(total, this.device);
      const rs = uniforms.add(REDUCE_PARAMS.pack({
        num_slots: numSlots * LANES, // one partial per invocation
        rows: gRows,
        row_base: row0,
        group,
        q_tokens: qTokens,
        total,
        groups_x: rx,
      }));
      jobs.push(() =>
        this.#dispatch(
          encoder,
          timer,
          this.#reduce,
          [
            uniforms.binding(rs),
            { buffer: part, size: partBytes },
            { buffer: this.#tables, offset: this.#vSignsOffset, size: d * 4 },
            { buffer: out, size: qBytes },
          ],
          rx,
          ry,
        )
      );
    }
    const recorder = "encoder" in target ? target : null;
    const label = "turboquant/tq-attention-params";
    if (recorder?.scratch) {
      uniforms.adopt(
        recorder.scratch(label, uniforms.size, GPUBufferUsage.UNIFORM, uniforms.bytes()),
      );
    } else {
      this.#transient.push(uniforms.upload(label));
    }
    for (const job of jobs) job();
  }

  /** Destroys the uniform buffers (and outgrown scratch) of recorded calls; call after submit. */
  releaseTransient(): void {
    for (const b of this.#transient.splice(0)) b.destroy();
  }

  /** Destroys tables and scratch. */
  destroy(): void {
    this.releaseTransient();
    this.#tables.destroy();
    this.#qjl?.destroy();
    this.#qr?.destroy();
    this.#part?.destroy();
    this.#qr = this.#part = null;
  }

  /** The main pipeline for a call: decode takes the smallest that holds the group. */
  #pick(group: number, qTokens: number): MainPipeline {
    const largest = this.#mains.at(-1)!;
    if (qTokens > 1) return largest;
    return this.#mains.find((m) => m.rows >= group) ?? largest;
  }

  #scratch(which: "qr" | "part", bytes: number): GPUBuffer {
    const have = which === "qr" ? this.#qr : this.#part;
    if (have && have.size >= bytes) return have;
    if (have) this.#transient.push(have); // recorded work may still use it
    const size = Math.max(256, Math.ceil((bytes * 1.25) / 256) * 256);
    const usage = which === "qr" ? STORAGE_USAGE | GPUBufferUsage.UNIFORM : STORAGE_USAGE;
    const buffer = createBuffer(this.device, `turboquant/tq-attention-${which}`, size, usage);
    if (which === "qr") this.#qr = buffer;
    else this.#part = buffer;
    return buffer;
  }

  #dispatch(
    encoder: Passes,
    timer: TqAttentionCall["timer"],
    pipeline: GPUComputePipeline,
    resources: (GPUBufferBinding | null)[],
    x: number,
    y = 1,
    z = 1,
  ): void {
    const entries: GPUBindGroupEntry[] = [];
    resources.forEach((resource, binding) => {
      if (resource) entries.push({ binding, resource });
    });
    const bindGroup = this.device.createBindGroup({
      label: `${pipeline.label}-bind`,
      layout: pipeline.getBindGroupLayout(0),
      entries,
    });
    const pass = encoder.begin(pipeline.label, timer?.passTimestamps());
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, bindGroup);
    pass.dispatchWorkgroups(x, y, z);
    pass.end();
  }
}

/** Begins compute passes on a bare encoder or through a recorder. */
interface Passes {
  begin(label: string, timestampWrites?: GPUComputePassTimestampWrites): GPUComputePassEncoder;
}

/** The uniform structs of one call, in one buffer at aligned offsets. */
class Uniforms {
  readonly #align: number;
  readonly #parts: Uint8Array[] = [];
  readonly #offsets: number[] = [];
  #size = 0;
  #buffer: GPUBuffer | null = null;
  readonly #device: GPUDevice;

  constructor(device: GPUDevice) {
    this.#device = device;
    this.#align = device.limits.minUniformBufferOffsetAlignment;
  }

  add(bytes: Uint8Array): number {
    const offset = roundUp(this.#size, this.#align);
    this.#parts.push(bytes);
    this.#offsets.push(offset);
    this.#size = offset + bytes.byteLength;
    return this.#parts.length - 1;
  }

  /** Bytes of the buffer. */
  get size(): number {
    return roundUp(Math.max(this.#size, 16), 16);
  }

  /** The packed contents. */
  bytes(): Uint8Array {
    const out = new Uint8Array(this.size);
    this.#parts.forEach((p, i) => out.set(p, this.#offsets[i]));
    return out;
  }

  /** Uses a buffer made elsewhere (already holding `bytes()`). */
  adopt(buffer: GPUBuffer): void {
    this.#buffer = buffer;
  }

  upload(label: string): GPUBuffer {
    if (this.#buffer) return this.#buffer;
    const buffer = this.#device.createBuffer({
      label,
      size: this.size,
      usage: GPUBufferUsage.UNIFORM,
      mappedAtCreation: true,
    });
    new Uint8Array(buffer.getMappedRange()).set(this.bytes());
    buffer.unmap();
    return this.#buffer = buffer;
  }

  binding(i: number): GPUBufferBinding {
    return { buffer: this.#buffer!, offset: this.#offsets[i], size: this.#parts[i].byteLength };
  }
}

function roundUp(n: number, m: number): number {
  return Math.ceil(n / m) * m;
}

/** A 2D grid of `groups` workgroups within the per-dimension limit. */
function grid2(groups: number, device: GPUDevice): [number, number] {
  const n = Math.max(1, groups);
  const maxX = device.limits.maxComputeWorkgroupsPerDimension;
  if (n <= maxX) return [n, 1];
  const y = Math.ceil(n / maxX);
  return [Math.ceil(n / y), y];
}
