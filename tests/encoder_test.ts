import assert from "node:assert/strict";
import {
  cosineSimilarity,
  EMBEDDING_DIM,
  type Encoder,
  HEAD_DIMS,
  type LayerInfo,
  loadEncoder,
  MAX_TOKENS,
  NUM_HEADS,
  NUM_LAYERS,
  referenceAttention,
} from "../examples/encoder/use_lite.ts";
import { PARAGRAPHS } from "../examples/encoder/texts.ts";

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

/** Adds seeded noise of relative size `rel` (of the tensor's RMS) to a copy of `x`. */
function perturb(x: Float32Array, rel: number, seed: number): Float32Array {
  let s = seed >>> 0;
  let rms = 0;
  for (const v of x) rms += v * v;
  rms = Math.sqrt(rms / x.length);
  const out = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = x[i] + rel * rms * (s / 2 ** 31 - 1);
  }
  return out;
}

Deno.test("encoder: USE lite, real Q/K/V and K/V replacement", async (t) => {
  const t0 = performance.now();
  const enc: Encoder = await loadEncoder();
  const loadMs = performance.now() - t0;
  try {
    await t.step("loads, reads the score scales from the graph", () => {
      assert.ok(loadMs < 15000, `load took ${loadMs} ms`);
      assert.equal(enc.scales.length, NUM_LAYERS);
      for (let l = 0; l < NUM_LAYERS; l++) {
        assert.ok(Math.abs(enc.scales[l] - 1 / Math.sqrt(HEAD_DIMS[l])) < 1e-7);
      }
    });

    const text = PARAGRAPHS[3].text;
    const cap = await enc.capture(text);

    await t.step("capture: shapes, tokens, embedding", async () => {
      assert.equal(cap.tokens, enc.tokenize(text).length);
      assert.ok(cap.tokens > 50 && cap.tokens <= MAX_TOKENS);
      assert.equal(cap.layers.length, NUM_LAYERS);
      for (const L of cap.layers) {
        const n = NUM_HEADS * cap.tokens * HEAD_DIMS[L.layer];
        assert.equal(L.numHeads, NUM_HEADS);
        assert.equal(L.headDim, HEAD_DIMS[L.layer]);
        assert.equal(L.tokens, cap.tokens);
        for (const x of [L.q, L.k, L.v, L.output]) assert.equal(x.length, n);
        assert.equal(L.probs.length, NUM_HEADS * cap.tokens * cap.tokens);
        assert.ok(L.k.every(Number.isFinite) && L.v.every(Number.isFinite));
      }
      assert.equal(cap.embedding.length, EMBEDDING_DIM);
      let norm = 0;
      for (const v of cap.embedding) norm += v * v;
      assert.ok(Math.abs(Math.sqrt(norm) - 1) < 1e-5, `embedding norm ${Math.sqrt(norm)}`);
      const again = await enc.embed(text);
      assert.ok(1 - cosineSimilarity(again, cap.embedding) < 1e-6);
      // Different paragraphs give different, but related, embeddings.
      const other = await enc.embed(PARAGRAPHS[0].text);
      const c = cosineSimilarity(other, cap.embedding);
      assert.ok(c < 0.95 && c > 0, `cosine between paragraphs ${c}`);
    });

    await t.step("softmax(Q K^T s) and probs @ V match the graph's Softmax and MatMul_1", () => {
      for (const L of cap.layers) {
        const r = referenceAttention(L, L.q, L.k, L.v);
        const ep = maxAbsDiff(r.probs, L.probs);
        const eo = maxAbsDiff(r.output, L.output);
        assert.ok(ep < 1e-4, `layer ${L.layer}: probs max abs error ${ep}`);
        assert.ok(eo < 1e-4, `layer ${L.layer}: output max abs error ${eo}`);
        // Bidirectional: the first query attends to the last key.
        assert.ok(L.probs[cap.tokens - 1] > 0);
      }
    });

    await t.step("captured K/V fed back reproduce the embedding", async () => {
      const e = await enc.embedWith(text, cap.layers.map((L) => ({ k: L.k, v: L.v })));
      assert.ok(1 - cosineSimilarity(e, cap.embedding) < 1e-6);
      const o = await enc.embedWithAttentionOutput(text, cap.layers.map((L) => L.output));
      assert.ok(1 - cosineSimilarity(o, cap.embedding) < 1e-6);
      const s = await enc.embedWithQuantizedKV(text, (_info, k, v) => ({ k, v }));
      assert.ok(1 - cosineSimilarity(s, cap.embedding) < 1e-6);
      const a = await enc.embedWithAttention(
        text,
        (info: LayerInfo, q, k, v) => referenceAttention(info, q, k, v).output,
      );
      assert.ok(1 - cosineSimilarity(a, cap.embedding) < 1e-6);
    });

    await t.step("perturbed K/V change the embedding", async () => {
      const cosines: number[] = [];
      for (let l = 0; l < NUM_LAYERS; l++) {
        for (const which of ["k", "v"] as const) {
          const kv = cap.layers.map(() => ({}));
          kv[l] = { [which]: perturb(cap.layers[l][which], 0.3, 11 + l) };
          const e = await enc.embedWith(text, kv);
          const c = cosineSimilarity(e, cap.embedding);
          cosines.push(c);
          assert.ok(c < 1 - 1e-5, `layer ${l} ${which}: cosine ${c}`);
          assert.ok(c > 0.5, `layer ${l} ${which}: cosine ${c}`);
        }
      }
      // More noise, more change.
      const small = await enc.embedWithQuantizedKV(text, (_i, k, v) => ({
        k: perturb(k, 0.05, 1),
        v: perturb(v, 0.05, 2),
      }));
      const large = await enc.embedWithQuantizedKV(text, (_i, k, v) => ({
        k: perturb(k, 0.5, 1),
        v: perturb(v, 0.5, 2),
      }));
      const cs = cosineSimilarity(small, cap.embedding);
      const cl = cosineSimilarity(large, cap.embedding);
      assert.ok(cl < cs && cs < 1, `small ${cs}, large ${cl}`);
    });

    await t.step("wrong shapes are rejected", async () => {
      await assert.rejects(
        () => enc.embedWith(text, [{ k: new Float32Array(10) }]),
        RangeError,
      );
      await assert.rejects(
        () => enc.embedWithAttentionOutput(text, [undefined, new Float32Array(3)]),
        RangeError,
      );
      await assert.rejects(() => enc.embedWith(text, [{}, {}, {}]), RangeError);
    });

    await t.step("the demo paragraphs fit the 128-token limit", () => {
      assert.ok(PARAGRAPHS.length >= 4 && PARAGRAPHS.length <= 8);
      for (const p of PARAGRAPHS) {
        const n = enc.tokenize(p.text).length;
        assert.ok(n <= 100 && n >= 40, `${p.year}: ${n} tokens`);
      }
      assert.equal(enc.tokenize("word ".repeat(300)).length, MAX_TOKENS);
    });
  } finally {
    enc.dispose();
  }
});
