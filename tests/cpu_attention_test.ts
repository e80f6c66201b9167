import assert from "node:assert/strict";
import { cpuAttention } from "../src/attention/cpu_reference.ts";
import { TurboQuantError } from "../src/errors.ts";
import { assertClose, Rng } from "./_helpers.ts";

Deno.test("cpuAttention", async (t) => {
  await t.step("equal keys give the mean of the values", () => {
    const headDim = 4;
    const seqLen = 3;
    const k = new Float32Array(seqLen * headDim).fill(0.5);
    const v = Float32Array.from({ length: seqLen * headDim }, (_, i) => i);
    const q = new Float32Array(headDim).fill(1);
    const out = cpuAttention(q, k, v, { numHeads: 1, numKvHeads: 1, headDim });
    assertClose(out, [4, 5, 6, 7], { rel: 1e-12, abs: 1e-12 });
  });

  await t.step("matches a direct softmax with scale, GQA and causal masking", () => {
    const rng = new Rng(7);
    const numHeads = 4;
    const numKvHeads = 2;
    const headDim = 8;
    const seqLen = 6;
    const qTokens = 3;
    const k = rng.gaussians(numKvHeads * seqLen * headDim);
    const v = rng.gaussians(numKvHeads * seqLen * headDim);
    const q = rng.gaussians(numHeads * qTokens * headDim);
    for (const causal of [false, true]) {
      const scale = 0.3;
      const out = cpuAttention(q, k, v, { numHeads, numKvHeads, headDim, scale, causal });
      for (let h = 0; h < numHeads; h++) {
        const kvh = Math.floor(h / 2);
        for (let i = 0; i < qTokens; i++) {
          const visible = causal ? seqLen - qTokens + i + 1 : seqLen;
          const w: number[] = [];
          for (let s = 0; s < visible; s++) {
            let dot = 0;
            for (let d = 0; d < headDim; d++) {
              dot += q[(h * qTokens + i) * headDim + d] * k[(kvh * seqLen + s) * headDim + d];
            }
            w.push(Math.exp(scale * dot));
          }
          const total = w.reduce((a, b) => a + b, 0);
          for (let d = 0; d < headDim; d++) {
            let o = 0;
            for (let s = 0; s < visible; s++) o += w[s] * v[(kvh * seqLen + s) * headDim + d];
            assert.ok(
              Math.abs(out[(h * qTokens + i) * headDim + d] - o / total) < 1e-6,
              `causal ${causal} head ${h} token ${i} dim ${d}`,
            );
          }
        }
      }
    }
  });

  await t.step("default scale is 1/sqrt(headDim)", () => {
    const rng = new Rng(3);
    const k = rng.gaussians(5 * 16);
    const v = rng.gaussians(5 * 16);
    const q = rng.gaussians(16);
    const opts = { numHeads: 1, numKvHeads: 1, headDim: 16 };
    assert.deepEqual(cpuAttention(q, k, v, opts), cpuAttention(q, k, v, { ...opts, scale: 0.25 }));
  });

  await t.step("bad shapes throw TurboQuantError", () => {
    const k = new Float32Array(16);
    const q = new Float32Array(8);
    const isTq = (e: unknown) => e instanceof TurboQuantError && e.code === "invalid-argument";
    assert.throws(() => cpuAttention(q, k, k, { numHeads: 3, numKvHeads: 2, headDim: 8 }), isTq);
    assert.throws(
      () => cpuAttention(q, k, new Float32Array(8), { numHeads: 1, numKvHeads: 1, headDim: 8 }),
      isTq,
    );
    assert.throws(
      () => cpuAttention(new Float32Array(24), k, k, { numHeads: 1, numKvHeads: 1, headDim: 8 }),
      /qTokens 3 > seqLen 2/,
    );
  });
});
