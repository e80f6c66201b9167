/**
 * Exact attention on the CPU (float64 accumulation): the oracle that GPU kernels are tested
 * against and the baseline of the benchmarks.
 *
 * @module
 */

import { check } from "../errors.ts";

/** Options of {@linkcode cpuAttention}. */
export interface CpuAttentionOptions {
  /** Query heads; a multiple of the KV heads (grouped-query attention). */
  numHeads: number;
  /** KV heads. */
  numKvHeads: number;
  /** Values per head. */
  headDim: number;
  /** Score scale; default `1 / sqrt(headDim)`. */
  scale?: number;
  /** Query i of qTokens sees positions `0 .. seqLen - qTokens + i` (default false). */
  causal?: boolean;
}

/**
 * Softmax attention of `q` ([numHeads, qTokens, headDim]) over `k` and `v`
 * ([numKvHeads, seqLen, headDim]); returns [numHeads, qTokens, headDim]. Query head h reads
 * KV head `floor(h / (numHeads / numKvHeads))`; the qTokens queries are the last positions.
 *
 * @example Two query heads sharing one KV head
 * ```ts
 * import { cpuAttention } from "@turboquant/turboquant";
 * const headDim = 8, seqLen = 3;
 * const k = new Float32Array(seqLen * headDim).map((_, i) => Math.sin(i));
 * const v = new Float32Array(seqLen * headDim).map((_, i) => Math.cos(i));
 * const q = new Float32Array(2 * headDim).fill(0.5);
 * const out = cpuAttention(q, k, v, { numHeads: 2, numKvHeads: 1, headDim });
 * console.log(out.length); // 16
 * ```
 */
export function cpuAttention(
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
  options: CpuAttentionOptions,
): Float32Array {
  const { numHeads, numKvHeads, headDim } = options;
  check(Number.isInteger(headDim) && headDim > 0, `cpuAttention: headDim ${headDim} invalid`);
  check(
    Number.isInteger(numKvHeads) && numKvHeads > 0,
    `cpuAttention: numKvHeads ${numKvHeads} invalid`,
  );
  check(
    Number.isInteger(numHeads) && numHeads > 0 && numHeads % numKvHeads === 0,
    `cpuAttention: numHeads ${numHeads} is not a positive multiple of numKvHeads ${numKvHeads}`,
  );
  check(
    k.length === v.length && k.length % (numKvHeads * headDim) === 0 && k.length > 0,
    `cpuAttention: k.length ${k.length} / v.length ${v.length} not [${numKvHeads}, seqLen, ${headDim}]`,
  );
  check(
    q.length % (numHeads * headDim) === 0 && q.length > 0,
    `cpuAttention: q.length ${q.length} is not a multiple of numHeads * headDim`,
  );
  const seqLen = k.length / (numKvHeads * headDim);
  const qTokens = q.length / (numHeads * headDim);
  check(qTokens <= seqLen, `cpuAttention: qTokens ${qTokens} > seqLen ${seqLen}`);
  const scale = options.scale ?? 1 / Math.sqrt(headDim);
  const group = numHeads / numKvHeads;
  const out = new Float32Array(q.length);
  const scores = new Float64Array(seqLen);
  const acc = new Float64Array(headDim);
  for (let h = 0; h < numHeads; h++) {
    const kvBase = Math.floor(h / group) * seqLen * headDim;
    for (let i = 0; i < qTokens; i++) {
      const qBase = (h * qTokens + i) * headDim;
      const visible = options.causal ? seqLen - qTokens + i + 1 : seqLen;
      let max = -Infinity;
      for (let t = 0; t < visible; t++) {
        const kb = kvBase + t * headDim;
        let dot = 0;
        for (let d = 0; d < headDim; d++) dot += q[qBase + d] * k[kb + d];
        const s = dot * scale;
        scores[t] = s;
        if (s > max) max = s;
      }
      acc.fill(0);
      let sum = 0;
      for (let t = 0; t < visible; t++) {
        const p = Math.exp(scores[t] - max);
        sum += p;
        const vb = kvBase + t * headDim;
        for (let d = 0; d < headDim; d++) acc[d] += p * v[vb + d];
      }
      for (let d = 0; d < headDim; d++) out[qBase + d] = acc[d] / sum;
    }
  }
  return out;
}
