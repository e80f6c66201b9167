import assert from "node:assert/strict";
import { cpuAttention, TurboQuantKVCache } from "../mod.ts";
import { createBuffer, readBuffer } from "../src/gpu/_buffers.ts";
import { assertRelativeError, gpuTest, Rng } from "./_helpers.ts";

function cosine(a: Float32Array, b: Float32Array): number {
  let ab = 0, aa = 0, bb = 0;
  for (let i = 0; i < a.length; i++) ab += a[i] * b[i], aa += a[i] * a[i], bb += b[i] * b[i];
  return ab / Math.sqrt(aa * bb);
}

/** Mean over (head, query) rows of the cosine between two [numHeads, qTokens, d] outputs. */
function meanRowCosine(a: Float32Array, b: Float32Array, d: number): number {
  let total = 0;
  const rows = a.length / d;
  for (let r = 0; r < rows; r++) {
    total += cosine(a.subarray(r * d, r * d + d), b.subarray(r * d, r * d + d));
  }
  return total / rows;
}

gpuTest(
  "attention equals CPU attention over the decoded cache (decode and causal prefill)",
  async (ctx) => {
    const rng = new Rng(11);
    for (
      const [numKvHeads, headDim, lengths] of [[2, 128, [1, 127, 128, 129, 4096]], [8, 64, [
        1,
        129,
        4096,
      ]]] as const
    ) {
      const numHeads = 8;
      const cache = ctx.track(
        new TurboQuantKVCache(ctx.device, { numLayers: 1, numKvHeads, headDim }),
      );
      for (const seqLen of lengths) {
        await cache.reset();
        const k = rng.gaussians(numKvHeads * seqLen * headDim);
        const v = rng.gaussians(numKvHeads * seqLen * headDim);
        await cache.append(0, k, v);
        // The reference reads what dequantize returns: the CPU decode plus the key mean.
        const dq = await cache.dequantize(0);
        for (const qTokens of [1, Math.min(seqLen, 4)]) {
          const q = rng.gaussians(numHeads * qTokens * headDim);
          const got = await cache.attention(0, q, { numHeads, causal: true });
          const want = cpuAttention(q, dq.k, dq.v, { numHeads, numKvHeads, headDim, causal: true });
          assertRelativeError(
            got,
            want,
            1e-4,
            `H${numKvHeads} d${headDim} len ${seqLen} q ${qTokens}`,
          );
        }
      }
    }
  },
);

gpuTest("70,000 tokens: bounded work per invocation (Mesa's loop cap)", async (ctx) => {
  const rng = new Rng(12);
  const numKvHeads = 2, headDim = 64, seqLen = 70_000, numHeads = 8;
  const cache = ctx.track(new TurboQuantKVCache(ctx.device, { numLayers: 1, numKvHeads, headDim }));
  const k = rng.uniforms(numKvHeads * seqLen * headDim, 1.7);
  const v = rng.uniforms(numKvHeads * seqLen * headDim, 1.7);
  await cache.append(0, k, v);
  const dq = await cache.dequantize(0);
  const q = rng.gaussians(numHeads * 2 * headDim);
  const got = await cache.attention(0, q, { numHeads, causal: true });
  const want = cpuAttention(q, dq.k, dq.v, { numHeads, numKvHeads, headDim, causal: true });
  assertRelativeError(got, want, 1e-4, "70,000 tokens");
});

gpuTest("GPUBuffer in, GPUBuffer out gives the same output", async (ctx) => {
  const rng = new Rng(13);
  const numKvHeads = 2, headDim = 64, seqLen = 300, numHeads = 4;
  const cache = ctx.track(new TurboQuantKVCache(ctx.device, { numLayers: 1, numKvHeads, headDim }));
  const k = rng.gaussians(numKvHeads * seqLen * headDim);
  const kBuffer = ctx.track(
    createBuffer(ctx.device, "turboquant/test-k", k.byteLength, undefined, k),
  );
  await cache.appendBuffers(0, kBuffer, kBuffer, seqLen);
  const q = rng.gaussians(numHeads * headDim);
  const qBuffer = ctx.track(
    createBuffer(ctx.device, "turboquant/test-q", q.byteLength, undefined, q),
  );
  const out = ctx.track(await cache.attentionBuffers(0, qBuffer, { numHeads, qTokens: 1 }));
  const viaGpu = new Float32Array(await readBuffer(ctx.device, out, 0, q.byteLength));
  assert.deepEqual(viaGpu, await cache.attention(0, q, { numHeads }));
});

gpuTest("one dominant token: the output is its decoded V, headroom gets no weight", async (ctx) => {
  const rng = new Rng(14);
  const numKvHeads = 1, headDim = 128, numHeads = 2;
  const cache = ctx.track(
    new TurboQuantKVCache(ctx.device, { numLayers: 1, numKvHeads, headDim, initialCapacity: 1000 }),
  );
  const k = rng.gaussians(headDim);
  const v = rng.gaussians(headDim);
  await cache.append(0, k, v);
  const { v: decoded } = await cache.dequantize(0);
  const q = new Float32Array(numHeads * headDim);
  for (let h = 0; h < numHeads; h++) q.set(k.map((x) => 50 * x), h * headDim);
  const out = await cache.attention(0, q, { numHeads });
  for (let h = 0; h < numHeads; h++) {
    assertRelativeError(out.subarray(h * headDim, (h + 1) * headDim), decoded, 1e-6, `head ${h}`);
  }
  // Distinct V: every output dimension is non-zero.
  assert.ok(out.every((x) => x !== 0));
});

gpuTest("accuracy against exact f32 attention on the original Gaussian K/V", async (ctx) => {
  const rng = new Rng(15);
  const numKvHeads = 2, headDim = 128, numHeads = 8, seqLen = 1024, qTokens = 8;
  const k = rng.gaussians(numKvHeads * seqLen * headDim);
  const v = rng.gaussians(numKvHeads * seqLen * headDim);
  const q = rng.gaussians(numHeads * qTokens * headDim);
  const outlier = k.slice();
  for (let i = 0; i < outlier.length; i++) if (i % headDim < 4) outlier[i] *= 20;
  const figures: string[] = [];
  for (const [name, keys] of [["gaussian", k], ["outlier channels x20", outlier]] as const) {
    const exact = cpuAttention(q, keys, v, { numHeads, numKvHeads, headDim, causal: true });
    for (const bits of [4, 3, 2]) {
      const cache = ctx.track(
        new TurboQuantKVCache(ctx.device, {
          numLayers: 1,
          numKvHeads,
          headDim,
          keyBits: bits,
          valueBits: bits,
        }),
      );
      await cache.append(0, keys, v);
      const got = await cache.attention(0, q, { numHeads, causal: true });
      const cos = meanRowCosine(got, exact, headDim);
      figures.push(`${name} K${bits}/V${bits}: cosine ${cos.toFixed(4)}`);
      if (name === "gaussian" && bits === 4) assert.ok(cos >= 0.985, `4 bits: ${cos}`);
      if (name === "gaussian" && bits === 3) assert.ok(cos >= 0.955, `3 bits: ${cos}`);
    }
  }
  console.log(`attention output cosine vs exact f32: ${figures.join("; ")}`);
});
