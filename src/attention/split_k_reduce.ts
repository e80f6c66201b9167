/**
 * The split-K merge pass shared by every attention kernel: partial slots of (HD / 4
 * accumulator vec4s, then one (max, sum, 0, 0) vec4), laid out [kvHead][row][slot], merged
 * into out[head][qToken][headDim] = acc / sum. Rows with more slots than `fanIn` are merged in
 * several passes, so no invocation loops more than `fanIn` times (Mesa's iteration cap).
 *
 * @module
 */

import { SPLIT_K_REDUCE_WGSL } from "../_shaders/split_k_reduce.ts";
import { composeShader, getPipeline } from "../gpu/_pipelines.ts";
import { uniformLayout } from "../gpu/_uniforms.ts";
import type { CacheJob } from "../cache/kv_cache_base.ts";

/** Default slots merged per invocation. */
export const SPLIT_K_FAN_IN = 4096;

/** Bytes of one partial slot for `headDim`. */
export function slotBytes(headDim: number): number {
  return (headDim / 4 + 1) * 16;
}

const PARAMS = uniformLayout({
  num_in: "u32",
  fan_in: "u32",
  num_out: "u32",
  rows: "u32",
  row_base: "u32",
  group: "u32",
  q_tokens: "u32",
  final_pass: "u32",
});

/** Invocations of the reduce workgroup for `headDim`. */
function reduceWorkgroup(headDim: number): number {
  return Math.max(8, headDim / 4);
}

/** The reduce pipeline for `headDim` (a multiple of 4), cached per device. */
export function splitKReducePipeline(
  device: GPUDevice,
  headDim: number,
): Promise<GPUComputePipeline> {
  return getPipeline(device, {
    label: `turboquant/split-k-reduce-hd${headDim}`,
    code: composeShader({ HD: headDim, WG: reduceWorkgroup(headDim) }, SPLIT_K_REDUCE_WGSL),
  });
}

/** The passes merging `slots` slots per row: each pass's input and output slot counts. */
export function reducePasses(slots: number, fanIn: number = SPLIT_K_FAN_IN): {
  numIn: number;
  fanIn: number;
  numOut: number;
}[] {
  const passes: { numIn: number; fanIn: number; numOut: number }[] = [];
  let n = slots;
  while (n > fanIn) {
    const out = Math.ceil(n / fanIn);
    passes.push({ numIn: n, fanIn, numOut: out });
    n = out;
  }
  passes.push({ numIn: n, fanIn: n, numOut: 1 });
  return passes;
}

/** What one row batch's reduce needs. */
export interface SplitKReduceArgs {
  /** Partials [kvHead][row][slot] of this batch. */
  partials: GPUBuffer;
  /** Slots per row. */
  slots: number;
  /** Rows of this batch per KV head (row = qToken * groupSize + head in group). */
  rows: number;
  /** First row of this batch. */
  rowBase: number;
  /** KV heads. */
  numKvHeads: number;
  /** Query heads per KV head. */
  groupSize: number;
  /** Query tokens. */
  qTokens: number;
  /** Head dimension (a multiple of 4). */
  headDim: number;
  /** Output [numHeads][qTokens][headDim] f32. */
  out: GPUBuffer;
  /** Slots merged per invocation (tests lower it to exercise multi-pass merges). */
  fanIn?: number;
}

/** Records the merge passes into `pass` (intermediate buffers come from `job.scratch`). */
export function encodeSplitKReduce(
  job: Pick<CacheJob, "device" | "uniforms" | "scratch">,
  pass: GPUComputePassEncoder,
  pipeline: GPUComputePipeline,
  args: SplitKReduceArgs,
): void {
  const passes = reducePasses(args.slots, args.fanIn);
  let input = args.partials;
  for (const p of passes) {
    const final = p.numOut === 1 && p === passes[passes.length - 1];
    const output = final ? args.out : job.scratch(
      "split-k-merge",
      args.numKvHeads * args.rows * p.numOut * slotBytes(args.headDim),
    );
    const uniform = job.uniforms.slot(PARAMS.pack({
      num_in: p.numIn,
      fan_in: p.fanIn,
      num_out: p.numOut,
      rows: args.rows,
      row_base: args.rowBase,
      group: args.groupSize,
      q_tokens: args.qTokens,
      final_pass: final ? 1 : 0,
    }));
    const group = job.device.createBindGroup({
      label: "turboquant/split-k-reduce",
      layout: pipeline.getBindGroupLayout(0),
      entries: [
        { binding: 0, resource: uniform },
        { binding: 1, resource: { buffer: input } },
        {
          binding: 2,
          // Bind exactly the output (a caller's buffer may exceed the binding limit).
          resource: final
            ? {
              buffer: output,
              size: args.numKvHeads * args.groupSize * args.qTokens * args.headDim * 4,
            }
            : { buffer: output },
        },
      ],
    });
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, group);
    pass.dispatchWorkgroups(args.rows, args.numKvHeads, p.numOut);
    input = output;
  }
}
