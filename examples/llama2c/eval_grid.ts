/**
 * The KV-cache evaluation grid on a llama2.c model: teacher-forced perplexity, mean KL
 * divergence of the next-token distribution against the exact f32 run, and top-1 agreement,
 * for exact attention, the TurboQuant cache at several K/V bit pairs (each with and without key
 * centring), and llama.cpp-style q4_0 on centred keys as a baseline at the same bits per value.
 *
 * The TurboQuant rows come from a {@linkcode CacheFactory}: by default the CPU simulation
 * ({@linkcode SimulatedCodecBackend} around {@linkcode TurboQuantCodec}), which produces the
 * codes the GPU cache produces; pass a factory that builds the library's `TurboQuantKVCache`
 * to evaluate the GPU cache itself.
 *
 * @module
 */

import { TurboQuantCodec } from "../../mod.ts";
import {
  type AttentionBackend,
  type CodecRoundTrip,
  SimulatedCodecBackend,
} from "./attention_backend.ts";
import {
  type BackendFactory,
  compareRuns,
  type Comparison,
  cpuBackendFactory,
  teacherForced,
  type TeacherForcedOptions,
  type TeacherForcedResult,
} from "./eval.ts";
import type { LlamaConfig, LlamaModel } from "./model.ts";

/** Settings of one compressed-cache configuration. */
export interface CacheSpec {
  /** Key bits per value (codes only). */
  keyBits: number;
  /** Value bits per value (codes only). */
  valueBits: number;
  /** Subtract the mean key of the first append (per layer, KV head and channel). */
  keyCentering: boolean;
}

/**
 * Builds the backend factory of one TurboQuant configuration. The GPU cache plugs in as
 * `(spec) => (config) => new TurboQuantKVCache(device, { numLayers: config.numLayers,
 * numKvHeads: config.numKvHeads, headDim: config.headDim, ...spec })`.
 */
export type CacheFactory = (spec: CacheSpec) => BackendFactory;

/** One row of the grid. */
export interface GridRow {
  /** Label in the table, e.g. "TurboQuant K4/V4 centred". */
  name: string;
  /** "exact": f32 attention; "turboquant": the cache factory; "q4_0": the baseline. */
  kind: "exact" | "turboquant" | "q4_0";
  /** Bit settings (absent for the exact row). */
  spec?: CacheSpec;
}

/** K/V bit pairs of the grid, in table order. */
export const GRID_BITS: readonly (readonly [number, number])[] = [
  [8, 8],
  [8, 4],
  [6, 4],
  [5, 4],
  [4, 4],
  [4, 3],
  [3, 3],
  [8, 3],
];

/** The grid: exact, every bit pair with and without key centring, q4_0 on centred keys. */
export function gridRows(): GridRow[] {
  const rows: GridRow[] = [{ name: "exact f32", kind: "exact" }];
  for (const [keyBits, valueBits] of GRID_BITS) {
    for (const keyCentering of [true, false]) {
      rows.push({
        name: `TurboQuant K${keyBits}/V${valueBits}${keyCentering ? " centred" : ""}`,
        kind: "turboquant",
        spec: { keyBits, valueBits, keyCentering },
      });
    }
  }
  rows.push({
    name: "q4_0 K/V, centred keys",
    kind: "q4_0",
    spec: { keyBits: 4, valueBits: 4, keyCentering: true },
  });
  return rows;
}

/** Options of the simulated TurboQuant cache beyond the bits (passed to the codecs). */
export interface SimulationOptions {
  /** Values rotated and scaled together (default: the codec's, min(32, headDim) here). */
  blockSize?: number;
  /** Candidate scales per block (default: the codec's, 9). */
  scaleSearch?: number;
  /** Seed of the key codec's signs (default 0). */
  seed?: number;
  /** Seed of the value codec's signs (default: the key seed, one rotation per head). */
  valueSeed?: number;
}

/**
 * Quantize-dequantize round trip through a pair of codecs (one for K, one for V) over
 * [numKvHeads, tokens, headDim] arrays.
 */
export function codecRoundTrip(
  keyCodec: TurboQuantCodec,
  valueCodec: TurboQuantCodec,
): CodecRoundTrip {
  return (x, kind) => {
    const codec = kind === "k" ? keyCodec : valueCodec;
    return codec.decode(codec.encode(x));
  };
}

/** The default {@linkcode CacheFactory}: exact attention over TurboQuant-degraded K/V. */
export function simulatedTurboQuant(options: SimulationOptions = {}): CacheFactory {
  return (spec: CacheSpec): BackendFactory => (config: LlamaConfig): AttentionBackend => {
    const seed = options.seed ?? 0;
    const common = {
      headDim: config.headDim,
      blockSize: options.blockSize,
      scaleSearch: options.scaleSearch,
    };
    const keyCodec = new TurboQuantCodec({ ...common, bits: spec.keyBits, seed });
    const valueCodec = new TurboQuantCodec({
      ...common,
      bits: spec.valueBits,
      seed: options.valueSeed ?? seed,
    });
    return new SimulatedCodecBackend(
      {
        numLayers: config.numLayers,
        numKvHeads: config.numKvHeads,
        headDim: config.headDim,
        initialCapacity: Math.min(config.seqLen, 512),
        keyCentering: spec.keyCentering,
      },
      codecRoundTrip(keyCodec, valueCodec),
    );
  };
}

/**
 * llama.cpp q4_0 quantize-dequantize (`quantize_row_q4_0_ref`) with blocks of `block` values
 * (one f16 scale each): the value of largest magnitude, with its sign, is `max`; `d = max / -8`;
 * codes `min(15, trunc(x / d + 8.5))`; decode `(code - 8) * f16(d)`. Costs 4 + 16 / block bits
 * per value: 6 at block 8 (a head_dim-8 head), 4.5 at llama.cpp's block 32.
 */
export function q4_0Blocks(x: Float32Array, block: number): Float32Array {
  if (!Number.isInteger(block) || block <= 0 || x.length % block !== 0) {
    throw new RangeError(`length ${x.length} is not a multiple of the block ${block}`);
  }
  const f32 = Math.fround;
  const out = new Float32Array(x.length);
  for (let o = 0; o < x.length; o += block) {
    let amax = 0;
    let max = 0;
    for (let j = 0; j < block; j++) {
      const v = x[o + j];
      if (amax < Math.abs(v)) {
        amax = Math.abs(v);
        max = v;
      }
    }
    const d = f32(max / -8);
    const id = d !== 0 ? f32(1 / d) : 0;
    const dh = Math.f16round(d);
    for (let j = 0; j < block; j++) {
      const q = Math.min(15, Math.trunc(f32(f32(x[o + j] * id) + 8.5)));
      out[o + j] = (q - 8) * dh;
    }
  }
  return out;
}

/**
 * q4_0 on K and V, blocks of min(32, headDim) values (so no block straddles two heads), with
 * key centring when `keyCentering` is set.
 */
export function q4_0Factory(keyCentering: boolean): BackendFactory {
  return (config: LlamaConfig): AttentionBackend => {
    const block = Math.min(32, config.headDim);
    return new SimulatedCodecBackend(
      {
        numLayers: config.numLayers,
        numKvHeads: config.numKvHeads,
        headDim: config.headDim,
        initialCapacity: Math.min(config.seqLen, 512),
        keyCentering,
      },
      (x) => q4_0Blocks(x, block),
    );
  };
}

/** Stored bits per value of a block format: code bits plus one f16 scale per block. */
export function storedBits(bits: number, block: number): number {
  return bits + 16 / block;
}

/** One measured row. */
export interface GridResult {
  /** The row measured. */
  row: GridRow;
  /** Stored bits per value of K and V (scales included; 32 for exact f32). */
  keyBitsPerValue: number;
  /** See keyBitsPerValue. */
  valueBitsPerValue: number;
  /** Its teacher-forced perplexity. */
  perplexity: number;
  /** Against the exact run. */
  comparison: Comparison;
  /** Seconds the run took. */
  seconds: number;
}

/** Options of {@linkcode runGrid}. */
export interface GridOptions extends TeacherForcedOptions {
  /** Rows to run (default {@linkcode gridRows}). */
  rows?: readonly GridRow[];
  /** Backends of the TurboQuant rows (default {@linkcode simulatedTurboQuant}()). */
  cacheFactory?: CacheFactory;
  /** Block size used for the bits-per-value column of TurboQuant rows (default min(32, headDim)). */
  blockSize?: number;
  /** The exact reference run, if already computed (must be over the same tokens). */
  reference?: TeacherForcedResult;
  /** Called after each row (default: a line on stderr). Pass `() => {}` to silence. */
  onProgress?: (done: number, total: number, result: GridResult) => void;
}

/** Runs every row over `tokens` against the exact f32 run; the exact row is the reference. */
export async function runGrid(
  model: LlamaModel,
  tokens: readonly number[],
  options: GridOptions = {},
): Promise<GridResult[]> {
  const rows = options.rows ?? gridRows();
  const cacheFactory = options.cacheFactory ?? simulatedTurboQuant();
  const block = options.blockSize ?? Math.min(32, model.config.headDim);
  const run: TeacherForcedOptions = { mode: options.mode, chunkSize: options.chunkSize };
  const progress = options.onProgress ??
    ((done: number, total: number, r: GridResult) =>
      console.error(
        `[${done}/${total}] ${r.row.name}: ppl ${r.perplexity.toFixed(4)}, KL ` +
          `${r.comparison.meanKl.toFixed(5)}, top-1 ${
            (r.comparison.top1Agreement * 100).toFixed(1)
          }% ` +
          `(${r.seconds.toFixed(1)} s)`,
      ));
  const reference = options.reference ??
    await teacherForced(model, tokens, cpuBackendFactory, { mode: "prefill" });
  const results: GridResult[] = [];
  for (const row of rows) {
    const start = performance.now();
    let factory: BackendFactory;
    let kb = 32, vb = 32;
    if (row.kind === "exact") {
      factory = cpuBackendFactory;
    } else if (!row.spec) {
      throw new RangeError(`row ${row.name} has no bit settings`);
    } else if (row.kind === "q4_0") {
      factory = q4_0Factory(row.spec.keyCentering);
      kb = vb = storedBits(4, Math.min(32, model.config.headDim));
    } else {
      factory = cacheFactory(row.spec);
      kb = storedBits(row.spec.keyBits, block);
      vb = storedBits(row.spec.valueBits, block);
    }
    const candidate = row.kind === "exact" && options.mode !== "decode" && !options.chunkSize
      ? reference
      : await teacherForced(model, tokens, factory, run);
    const result: GridResult = {
      row,
      keyBitsPerValue: kb,
      valueBitsPerValue: vb,
      perplexity: candidate.perplexity,
      comparison: compareRuns(reference, candidate),
      seconds: (performance.now() - start) / 1000,
    };
    results.push(result);
    progress(results.length, rows.length, result);
  }
  return results;
}

/** The grid as a markdown table. */
export function formatGrid(results: readonly GridResult[]): string {
  const lines = [
    "| config | bits/value K | bits/value V | ppl | ppl change % | mean KL | top-1 agreement |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  ];
  for (const r of results) {
    const c = r.comparison;
    const sign = c.perplexityChange >= 0 ? "+" : "";
    lines.push(
      `| ${r.row.name} | ${fmtBits(r.keyBitsPerValue)} | ${fmtBits(r.valueBitsPerValue)} | ` +
        `${r.perplexity.toFixed(4)} | ${sign}${(c.perplexityChange * 100).toFixed(2)} | ` +
        `${c.meanKl.toFixed(5)} | ${(c.top1Agreement * 100).toFixed(1)}% |`,
    );
  }
  return lines.join("\n");
}

function fmtBits(b: number): string {
  return Number.isInteger(b) ? String(b) : b.toFixed(2).replace(/0$/, "");
}
