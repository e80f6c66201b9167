/**
 * Host side of the uncompressed split-K attention kernel: the plan (rows per workgroup, chunk
 * size, row batches, partial slots), pipelines, and the dispatches of one attention call.
 *
 * @module
 */

import { UNCOMPRESSED_SCORES_WGSL } from "../_shaders/uncompressed_scores.ts";
import { UNCOMPRESSED_VALUES_WGSL } from "../_shaders/uncompressed_values.ts";
import { TurboQuantError } from "../errors.ts";
import { isSoftwareDevice } from "../gpu/device.ts";
import { composeShader, getPipeline } from "../gpu/_pipelines.ts";
import { uniformLayout } from "../gpu/_uniforms.ts";
import type { AttentionJob } from "../cache/kv_cache_base.ts";
import {
  encodeSplitKReduce,
  slotBytes,
  SPLIT_K_FAN_IN,
  splitKReducePipeline,
} from "./split_k_reduce.ts";

/** Per-invocation loop iterations we allow (Mesa stops loops at 65,535, silently). */
export const ITERATION_BUDGET = 32768;

/** Largest chunk, in tokens. */
const MAX_CHUNK = 4096;

/** Scratch of one row batch (partials, scores, lane maxima) stays below this many bytes. */
const BATCH_BUDGET = 256 * 1024 * 1024;

/** Workgroups an attention call should have at least (2 per core on 16 cores). */
const TARGET_WORKGROUPS = 32;

/** Kernel variant: the compile-time constants of the two passes. */
export interface AttentionKernelShape {
  /** Head dimension (multiple of 8). */
  headDim: number;
  /** Query rows per workgroup (1, 2, 4 or 8). */
  qb: number;
  /** Invocations of the scores pass (one token each). */
  wg: number;
  /** Invocations of the values pass. */
  vl: number;
  /** Column lanes of the values pass (a divisor of headDim / 4, at most vl). */
  cl: number;
  /** Largest chunk, in tokens. */
  cmax: number;
  /** f16 storage. */
  f16: boolean;
}

/** How one attention call is split. */
export interface AttentionPlan extends AttentionKernelShape {
  /** Tokens per chunk (the split-K unit). */
  chunkTokens: number;
  /** Rows per KV head: groupSize * qTokens. */
  rowsTotal: number;
  /** Rows per batch (each scratch buffer fits a binding, all of them `BATCH_BUDGET`). */
  rowBatch: number;
  /** Chunk slots per row, over all windows. */
  slots: number;
  /** Partial slots per row: slots times the values pass's token groups. */
  partialSlots: number;
  /** Scores per row in the score buffer (the largest window). */
  sStride: number;
  /** Per window: first token, tokens, chunks, first chunk slot. */
  windows: { start: number; tokens: number; chunks: number; slotBase: number }[];
}

/** Inputs of {@linkcode planAttention}. */
export interface PlanInput {
  headDim: number;
  f16: boolean;
  numKvHeads: number;
  groupSize: number;
  qTokens: number;
  /** Windows covering [0, seqLen): first token and tokens. */
  windows: readonly { start: number; tokens: number }[];
  /** Largest storage binding in bytes. */
  bindingLimit: number;
  /** Invocations per workgroup (8 on CPU adapters, 64 on GPUs). */
  lanes: number;
  /** Override of the chunk size (tests). */
  chunkTokens?: number;
}

/** Upper bound of the loop iterations one invocation runs on a chunk of `chunk` tokens. */
export function iterationsPerInvocation(s: AttentionKernelShape, chunk: number): number {
  // Everything else is unrolled; the token loops remain (the larger of the two passes).
  const ng = Math.floor(s.vl / s.cl);
  return Math.max(Math.ceil(chunk / s.wg), Math.ceil(chunk / ng));
}

/** Kernel constants for `headDim`, rows per KV head, dtype and lanes. */
export function kernelShape(
  headDim: number,
  rows: number,
  f16: boolean,
  lanes: number,
): AttentionKernelShape {
  // Query rows live in registers: at most 512 values per lane.
  const qbMax = Math.max(1, Math.min(8, Math.floor(512 / headDim)));
  let qb = 1;
  while (qb < Math.min(rows, qbMax)) qb *= 2;
  const hd4 = headDim / 4;
  let cl = Math.min(lanes, hd4);
  while (hd4 % cl !== 0) cl--;
  const base = { headDim, qb, wg: lanes, vl: lanes, cl, f16 };
  let cmax = MAX_CHUNK;
  while (cmax > 64 && iterationsPerInvocation({ ...base, cmax }, cmax) > ITERATION_BUDGET) {
    cmax -= 64;
  }
  return { ...base, cmax };
}

/** The compile-time constants of a kernel shape, as the WGSL expects them. */
export function shapeConstants(s: AttentionKernelShape): Record<string, number | boolean> {
  const hd4 = s.headDim / 4;
  return {
    HD: s.headDim,
    HD4: hd4,
    QB: s.qb,
    WG: s.wg,
    VL: s.vl,
    CL: s.cl,
    CV: hd4 / s.cl,
    NG: Math.floor(s.vl / s.cl),
    KW: s.f16 ? s.headDim / 8 : hd4,
    VW: s.f16 ? s.headDim / 2 : s.headDim,
    F16: s.f16,
  };
}

/** Splits one attention call into chunks, windows and row batches. */
export function planAttention(input: PlanInput): AttentionPlan {
  const rowsTotal = input.groupSize * input.qTokens;
  const shape = kernelShape(input.headDim, rowsTotal, input.f16, input.lanes);
  const seqLen = input.windows.reduce((n, w) => n + w.tokens, 0);
  let chunkTokens = input.chunkTokens ?? 0;
  if (!chunkTokens) {
    // Enough chunks that the call has TARGET_WORKGROUPS workgroups, chunks a multiple of 64.
    const blocks = input.numKvHeads * Math.ceil(rowsTotal / shape.qb);
    const wanted = Math.max(1, Math.ceil(TARGET_WORKGROUPS / blocks));
    chunkTokens = Math.ceil(Math.ceil(seqLen / wanted) / 64) * 64;
    chunkTokens = Math.max(64, Math.min(shape.cmax, chunkTokens));
  }
  chunkTokens = Math.min(chunkTokens, shape.cmax);
  const windows: AttentionPlan["windows"] = [];
  let slots = 0;
  for (const w of input.windows) {
    const chunks = Math.ceil(w.tokens / chunkTokens);
    if (chunks > 65535) {
      throw new TurboQuantError(
        "invalid-state",
        `attention: ${chunks} chunks of ${chunkTokens} tokens exceed 65535 workgroups per dimension`,
      );
    }
    windows.push({ start: w.start, tokens: w.tokens, chunks, slotBase: slots });
    slots += chunks;
  }
  const ng = Math.floor(shape.vl / shape.cl);
  const partialSlots = slots * ng;
  const sStride = Math.max(...input.windows.map((w) => w.tokens));
  const kv = input.numKvHeads;
  const partialRow = kv * partialSlots * slotBytes(input.headDim);
  const scoreRow = kv * sStride * 4;
  const maxRow = kv * slots * shape.wg * 4;
  const perRow = partialRow + scoreRow + maxRow;
  // Each scratch buffer fits one binding; together they stay within BATCH_BUDGET.
  const budget = BATCH_BUDGET;
  let rowBatch = Math.min(
    rowsTotal,
    Math.floor(budget / perRow),
    Math.floor(input.bindingLimit / Math.max(partialRow, scoreRow, maxRow)),
    65535,
  );
  // Whole blocks per batch where possible (a partial block only wastes lanes).
  if (rowBatch < rowsTotal && rowBatch >= shape.qb) {
    rowBatch = Math.floor(rowBatch / shape.qb) * shape.qb;
  }
  if (rowBatch < 1) {
    throw new TurboQuantError(
      "out-of-memory",
      `attention: ${slots} chunks per row need ${perRow} bytes of scratch per query row, over ` +
        `the ${budget}-byte budget`,
    );
  }
  return { ...shape, chunkTokens, rowsTotal, rowBatch, slots, partialSlots, sStride, windows };
}

const SCORE_PARAMS = uniformLayout({
  window_tokens: "u32",
  window_start: "u32",
  chunk_tokens: "u32",
  slot_base: "u32",
  num_slots: "u32",
  s_stride: "u32",
  kv_heads: "u32",
  group: "u32",
  q_tokens: "u32",
  row_base: "u32",
  rows: "u32",
  seq_len: "u32",
  causal: "u32",
  scale: "f32",
});

const VALUE_PARAMS = uniformLayout({
  window_tokens: "u32",
  window_start: "u32",
  chunk_tokens: "u32",
  slot_base: "u32",
  num_slots: "u32",
  s_stride: "u32",
  kv_heads: "u32",
  group: "u32",
  q_tokens: "u32",
  row_base: "u32",
  rows: "u32",
  seq_len: "u32",
  causal: "u32",
});

/** Invocations per attention workgroup: one SIMD batch on CPU adapters, 64 on GPUs. */
export function attentionLanes(device: GPUDevice): number {
  return isSoftwareDevice(device) ? 8 : 64;
}

/** Pipelines of one attention call. */
export interface AttentionPipelines {
  /** Pass 1: scores and lane maxima. */
  scores: GPUComputePipeline;
  /** Pass 2: p * V partials. */
  values: GPUComputePipeline;
  /** Split-K merge. */
  reduce: GPUComputePipeline;
}

/** Compiles (or fetches) what a call with `rows` rows per KV head needs. */
export async function uncompressedAttentionPipelines(
  device: GPUDevice,
  headDim: number,
  rows: number,
  f16: boolean,
): Promise<AttentionPipelines> {
  const s = kernelShape(headDim, rows, f16, attentionLanes(device));
  const name = `${f16 ? "f16" : "f32"}-hd${headDim}-qb${s.qb}`;
  const constants = shapeConstants(s);
  const [scores, values, reduce] = await Promise.all([
    getPipeline(device, {
      label: `turboquant/uncompressed-scores-${name}`,
      code: composeShader(constants, UNCOMPRESSED_SCORES_WGSL),
    }),
    getPipeline(device, {
      label: `turboquant/uncompressed-values-${name}`,
      code: composeShader(constants, UNCOMPRESSED_VALUES_WGSL),
    }),
    splitKReducePipeline(device, headDim),
  ]);
  return { scores, values, reduce };
}

/** Options of {@linkcode encodeUncompressedAttention} for tests. */
export interface EncodeOverrides {
  /** Force the chunk size. */
  chunkTokens?: number;
  /** Force the reduce fan-in. */
  fanIn?: number;
}

/** Records one attention call over an uncompressed layer (buffers "k" and "v"). */
export function encodeUncompressedAttention(
  job: AttentionJob,
  pipelines: AttentionPipelines,
  f16: boolean,
  numKvHeads: number,
  headDim: number,
  bindingLimit: number,
  overrides: EncodeOverrides = {},
): AttentionPlan {
  const plan = planAttention({
    headDim,
    f16,
    numKvHeads,
    groupSize: job.groupSize,
    qTokens: job.qTokens,
    windows: job.windows,
    bindingLimit,
    lanes: attentionLanes(job.device),
    chunkTokens: overrides.chunkTokens,
  });
  const qBytes = job.numHeads * job.qTokens * headDim * 4;
  const kv = numKvHeads;
  // One set of scratch buffers serves every row batch and window: a pass runs in order.
  const partials = job.scratch(
    "partials",
    kv * plan.rowBatch * plan.partialSlots * slotBytes(headDim),
  );
  const scores = job.scratch("scores", kv * plan.rowBatch * plan.sStride * 4);
  const maxima = job.scratch("lane-maxima", kv * plan.rowBatch * plan.slots * plan.wg * 4);
  const pass = job.beginComputePass("uncompressed-attention");
  for (let rowBase = 0; rowBase < plan.rowsTotal; rowBase += plan.rowBatch) {
    const rows = Math.min(plan.rowBatch, plan.rowsTotal - rowBase);
    job.windows.forEach((w, i) => {
      const pw = plan.windows[i];
      const common = {
        window_tokens: w.tokens,
        window_start: w.start,
        chunk_tokens: plan.chunkTokens,
        slot_base: pw.slotBase,
        num_slots: plan.slots,
        s_stride: plan.sStride,
        kv_heads: kv,
        group: job.groupSize,
        q_tokens: job.qTokens,
        row_base: rowBase,
        rows,
        seq_len: job.seqLen,
        causal: job.causal ? 1 : 0,
      };
      const groups: [number, number, number] = [pw.chunks, Math.ceil(rows / plan.qb), kv];
      pass.setPipeline(pipelines.scores);
      pass.setBindGroup(
        0,
        job.device.createBindGroup({
          label: "turboquant/uncompressed-scores",
          layout: pipelines.scores.getBindGroupLayout(0),
          entries: [
            {
              binding: 0,
              resource: job.uniforms.slot(SCORE_PARAMS.pack({ ...common, scale: job.scale })),
            },
            { binding: 1, resource: w.binding("k") },
            { binding: 2, resource: { buffer: job.q, size: qBytes } },
            { binding: 3, resource: { buffer: scores } },
            { binding: 4, resource: { buffer: maxima } },
          ],
        }),
      );
      pass.dispatchWorkgroups(...groups);
      pass.setPipeline(pipelines.values);
      pass.setBindGroup(
        0,
        job.device.createBindGroup({
          label: "turboquant/uncompressed-values",
          layout: pipelines.values.getBindGroupLayout(0),
          entries: [
            { binding: 0, resource: job.uniforms.slot(VALUE_PARAMS.pack(common)) },
            { binding: 1, resource: w.binding("v") },
            { binding: 2, resource: { buffer: scores } },
            { binding: 3, resource: { buffer: maxima } },
            { binding: 4, resource: { buffer: partials } },
          ],
        }),
      );
      pass.dispatchWorkgroups(...groups);
    });
    encodeSplitKReduce(job, pass, pipelines.reduce, {
      partials,
      slots: plan.partialSlots,
      rows,
      rowBase,
      numKvHeads: kv,
      groupSize: job.groupSize,
      qTokens: job.qTokens,
      headDim,
      out: job.out,
      fanIn: overrides.fanIn ?? SPLIT_K_FAN_IN,
    });
  }
  pass.end();
  return plan;
}
