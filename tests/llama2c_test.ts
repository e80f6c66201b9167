// End-to-end checks of the llama2.c example decoder against the reference figures in
// ../shared/models/README.md, plus synthetic checks of the legacy loader and the backends.

import assert from "node:assert/strict";
import {
  CpuAttentionBackend,
  SimulatedCodecBackend,
} from "../examples/llama2c/attention_backend.ts";
import { compareRuns, cpuBackendFactory, teacherForced } from "../examples/llama2c/eval.ts";
import { LlamaDecoder } from "../examples/llama2c/forward.ts";
import { generate } from "../examples/llama2c/generate.ts";
import {
  DEFAULT_MODEL_URL,
  type LlamaConfig,
  type LlamaModel,
  loadModel,
  parseLegacyModel,
  writeLegacyModel,
  writeLegacyTokenizer,
} from "../examples/llama2c/model.ts";
import { BOS_ID, Tokenizer } from "../examples/llama2c/tokenizer.ts";

const MODEL_URL = new URL("../../shared/models/stories260k.bin", import.meta.url);
const PASSAGE = "Lily and Ben were playing in the park. They saw a big red ball under a tree. " +
  "Lily ran to get it, but a dog took the ball and ran away.";
const GREEDY_PREFIX = "Once upon a time, there was a little girl named Lily. She loved to play " +
  "outside in the park";

let haveModel = false;
try {
  haveModel = (await Deno.stat(MODEL_URL)).isFile;
} catch {
  haveModel = false;
}
if (!haveModel) {
  console.log(`llama2c_test: ${MODEL_URL.pathname} not found, skipping the real-model tests`);
}

let cached: LlamaModel | undefined;
async function model(): Promise<LlamaModel> {
  cached ??= await loadModel(MODEL_URL);
  return cached;
}

Deno.test("default model URL points at ../shared/models", () => {
  assert.equal(DEFAULT_MODEL_URL.href, MODEL_URL.href);
});

Deno.test({
  name: "v1 loader reads the stories260k config",
  ignore: !haveModel,
  async fn() {
    const m = await model();
    assert.equal(m.format, "v1");
    const { dim, hiddenDim, numLayers, numHeads, numKvHeads, vocabSize, seqLen, headDim } =
      m.config;
    assert.deepEqual(
      { dim, hiddenDim, numLayers, numHeads, numKvHeads, vocabSize, seqLen, headDim },
      {
        dim: 64,
        hiddenDim: 172,
        numLayers: 5,
        numHeads: 8,
        numKvHeads: 4,
        vocabSize: 512,
        seqLen: 512,
        headDim: 8,
      },
    );
    assert.equal(m.weights.classifier, m.weights.tokenEmbedding);
  },
});

Deno.test({
  name: "tokenizer round trip on the passage, the story and byte fallback",
  ignore: !haveModel,
  async fn() {
    const tok = new Tokenizer((await model()).vocab);
    const ids = tok.encode(PASSAGE);
    assert.equal(ids.length, 56);
    assert.equal(ids[0], BOS_ID);
    assert.equal(tok.decode(ids), PASSAGE);
    const story = await Deno.readTextFile(
      new URL("../examples/llama2c/story.txt", import.meta.url),
    );
    const storyIds = tok.encode(story);
    assert.ok(storyIds.length >= 400 && storyIds.length <= 512, `${storyIds.length} tokens`);
    assert.equal(tok.decode(storyIds), story);
    // A snowman has no piece: it falls back to its UTF-8 bytes (E2 98 83) as ids byte + 3.
    const accented = tok.encode("a\u2603", { bos: false });
    assert.deepEqual(accented.slice(-3), [0xe2 + 3, 0x98 + 3, 0x83 + 3]);
    assert.equal(tok.decode([BOS_ID, ...accented]), "a\u2603");
  },
});

Deno.test({
  name: "teacher-forced perplexity on the passage is 3.578",
  ignore: !haveModel,
  async fn() {
    const m = await model();
    const ids = new Tokenizer(m.vocab).encode(PASSAGE);
    const run = await teacherForced(m, ids, cpuBackendFactory, { mode: "prefill" });
    console.log(`passage perplexity ${run.perplexity.toFixed(4)}`);
    assert.ok(Math.abs(run.perplexity - 3.578) < 0.002, `perplexity ${run.perplexity}`);
  },
});

Deno.test({
  name: "greedy continuation of 'Once upon a time'",
  ignore: !haveModel,
  async fn() {
    const m = await model();
    const tok = new Tokenizer(m.vocab);
    const decoder = new LlamaDecoder(m, cpuBackendFactory(m.config) as CpuAttentionBackend);
    const result = await generate(decoder, tok.encode("Once upon a time"), { steps: 32 });
    const text = tok.decode(result.tokens);
    assert.ok(text.startsWith(GREEDY_PREFIX), text);
  },
});

Deno.test({
  name: "prefill, chunked prefill and token-by-token decode give the same logits",
  ignore: !haveModel,
  async fn() {
    const m = await model();
    const ids = new Tokenizer(m.vocab).encode(PASSAGE);
    const V = m.config.vocabSize;
    const whole = await new LlamaDecoder(m, cpuBackendFactory(m.config) as CpuAttentionBackend)
      .forward(ids, { logits: "all" });
    for (const chunk of [1, 7]) {
      const decoder = new LlamaDecoder(m, cpuBackendFactory(m.config) as CpuAttentionBackend);
      const parts: Float32Array[] = [];
      for (let s = 0; s < ids.length; s += chunk) {
        parts.push(await decoder.forward(ids.slice(s, s + chunk), { logits: "all" }));
      }
      let maxDiff = 0;
      let o = 0;
      for (const p of parts) {
        for (let i = 0; i < p.length; i++) {
          maxDiff = Math.max(maxDiff, Math.abs(p[i] - whole[o + i]));
        }
        o += p.length;
      }
      assert.equal(o, ids.length * V);
      assert.ok(maxDiff < 1e-4, `chunk ${chunk}: max logit difference ${maxDiff}`);
    }
    // "last" logits equal the last row of "all".
    const last = await new LlamaDecoder(m, cpuBackendFactory(m.config) as CpuAttentionBackend)
      .forward(ids);
    assert.deepEqual(last, whole.slice((ids.length - 1) * V));
  },
});

Deno.test({
  name: "eval: identical backends agree, a coarse simulated codec does not",
  ignore: !haveModel,
  async fn() {
    const m = await model();
    const ids = new Tokenizer(m.vocab).encode(PASSAGE);
    const ref = await teacherForced(m, ids);
    const decode = await teacherForced(m, ids, cpuBackendFactory, { mode: "decode" });
    const same = compareRuns(ref, decode);
    assert.ok(same.meanKl < 1e-6 && same.top1Agreement === 1, JSON.stringify(same));
    // Round every value to a multiple of 0.5: visibly worse, but still the same model.
    const coarse = (x: Float32Array): Float32Array => x.map((v) => Math.round(v * 2) / 2);
    const simulated = await teacherForced(m, ids, (c: LlamaConfig) =>
      new SimulatedCodecBackend(
        { numLayers: c.numLayers, numKvHeads: c.numKvHeads, headDim: c.headDim },
        coarse,
      ));
    const diff = compareRuns(ref, simulated);
    assert.ok(diff.meanKl > 1e-4, JSON.stringify(diff));
    assert.ok(diff.top1Agreement > 0.3, JSON.stringify(diff));
  },
});

/** Deterministic pseudo-random floats. */
function randomArray(n: number, seed: number): Float32Array {
  let s = seed >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = (s / 4294967296 - 0.5) * 0.4;
  }
  return out;
}

/** Builds a legacy llama2.c file by hand, in llama2.c's own order, from named arrays. */
function handWrittenLegacy(
  hdr: number[],
  arrays: Float32Array[],
): Uint8Array {
  const count = arrays.reduce((s, a) => s + a.length, 0);
  const out = new Uint8Array(28 + 4 * count);
  const view = new DataView(out.buffer);
  hdr.forEach((v, i) => view.setInt32(4 * i, v, true));
  let pos = 28;
  for (const a of arrays) {
    for (const v of a) {
      view.setFloat32(pos, v, true);
      pos += 4;
    }
  }
  return out;
}

function tinyTokenizerBin(pieces: string[], scores: number[]): Uint8Array {
  const enc = new TextEncoder();
  const bytes = pieces.map((p) => enc.encode(p));
  const out = new Uint8Array(4 + bytes.reduce((s, b) => s + 8 + b.length, 0));
  const view = new DataView(out.buffer);
  view.setInt32(0, 8, true);
  let pos = 4;
  bytes.forEach((b, i) => {
    view.setFloat32(pos, scores[i], true);
    view.setInt32(pos + 4, b.length, true);
    out.set(b, pos + 8);
    pos += 8 + b.length;
  });
  return out;
}

for (const shared of [true, false]) {
  Deno.test(`legacy loader maps every field (${shared ? "shared" : "separate"} classifier)`, () => {
    const dim = 8, hidden = 12, L = 2, H = 4, KV = 2, vocab = 10, seqLen = 6;
    const hd = dim / H, kvDim = KV * hd;
    let seed = 1;
    const r = (n: number): Float32Array => randomArray(n, seed++);
    const emb = r(vocab * dim), rmsAtt = r(L * dim), wq = r(L * dim * dim), wk = r(L * kvDim * dim);
    const wv = r(L * kvDim * dim), wo = r(L * dim * dim), rmsFfn = r(L * dim);
    const w1 = r(L * hidden * dim), w2 = r(L * dim * hidden), w3 = r(L * hidden * dim);
    const rmsFinal = r(dim), freqReal = r(seqLen * hd / 2), freqImag = r(seqLen * hd / 2);
    const wcls = r(vocab * dim);
    const arrays = [emb, rmsAtt, wq, wk, wv, wo, rmsFfn, w1, w2, w3, rmsFinal, freqReal, freqImag];
    if (!shared) arrays.push(wcls);
    const file = handWrittenLegacy(
      [dim, hidden, L, H, KV, shared ? vocab : -vocab, seqLen],
      arrays,
    );
    const pieces = ["<unk>", "\n<s>\n", "\n</s>\n", "<0x0A>", " ", "a", "b", " a", "ab", " ab"];
    const tokBin = tinyTokenizerBin(pieces, pieces.map((_, i) => i / 10));
    const m = parseLegacyModel(file, tokBin);

    assert.equal(m.format, "legacy");
    assert.equal(m.config.sharedClassifier, shared);
    assert.equal(m.config.vocabSize, vocab);
    assert.equal(m.config.kvDim, kvDim);
    assert.deepEqual(m.weights.tokenEmbedding, emb);
    assert.deepEqual(m.weights.finalNorm, rmsFinal);
    assert.deepEqual(m.weights.classifier, shared ? emb : wcls);
    const per = (a: Float32Array, l: number) =>
      a.subarray(l * (a.length / L), (l + 1) * (a.length / L));
    for (let l = 0; l < L; l++) {
      const lw = m.weights.layers[l];
      assert.deepEqual(lw.attnNorm, per(rmsAtt, l));
      assert.deepEqual(lw.wq, per(wq, l));
      assert.deepEqual(lw.wk, per(wk, l));
      assert.deepEqual(lw.wv, per(wv, l));
      assert.deepEqual(lw.wo, per(wo, l));
      assert.deepEqual(lw.ffnNorm, per(rmsFfn, l));
      assert.deepEqual(lw.wGate, per(w1, l)); // llama2.c w1
      assert.deepEqual(lw.wDown, per(w2, l)); // llama2.c w2
      assert.deepEqual(lw.wUp, per(w3, l)); // llama2.c w3
    }
    // Spaces of tokenizer.bin become U+2581, scores are kept.
    assert.equal(m.vocab.pieces[9], "\u2581ab");
    assert.ok(Math.abs(m.vocab.scores[9] - 0.9) < 1e-6);
    // Our writer produces the same bytes, RoPE tables aside (it writes real ones).
    const rewritten = writeLegacyModel(m.config, m.weights);
    assert.equal(rewritten.length, file.length);
    const back = parseLegacyModel(rewritten, writeLegacyTokenizer(m.vocab));
    assert.deepEqual(back.weights, m.weights);
    assert.deepEqual(back.vocab.pieces, m.vocab.pieces);
    // The decoder runs on it.
    const tok = new Tokenizer(m.vocab);
    assert.deepEqual(tok.encode("ab a", { bos: false }), [9, 7]);
    assert.equal(tok.decode([BOS_ID, 9, 7]), "ab a");
  });
}

Deno.test({
  name: "stories260k converted to the legacy format gives the same logits",
  ignore: !haveModel,
  async fn() {
    const m = await model();
    const dir = await Deno.makeTempDir();
    try {
      await Deno.writeFile(`${dir}/model.bin`, writeLegacyModel(m.config, m.weights));
      await Deno.writeFile(`${dir}/tokenizer.bin`, writeLegacyTokenizer(m.vocab));
      const legacy = await loadModel(`${dir}/model.bin`); // tokenizer.bin found beside it
      assert.equal(legacy.format, "legacy");
      const ids = new Tokenizer(legacy.vocab).encode(PASSAGE);
      assert.deepEqual(ids, new Tokenizer(m.vocab).encode(PASSAGE));
      const a = await new LlamaDecoder(m, cpuBackendFactory(m.config) as CpuAttentionBackend)
        .forward(ids, { logits: "all" });
      const b = await new LlamaDecoder(
        legacy,
        cpuBackendFactory(legacy.config) as CpuAttentionBackend,
      )
        .forward(ids, { logits: "all" });
      assert.deepEqual(a, b);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

/** Naive attention straight from the definition, for one layer's whole K/V. */
function naiveAttention(
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
  numHeads: number,
  numKvHeads: number,
  d: number,
  seqLen: number,
): Float32Array {
  const qTokens = q.length / (numHeads * d);
  const out = new Float32Array(q.length);
  for (let h = 0; h < numHeads; h++) {
    const kvh = Math.floor(h / (numHeads / numKvHeads));
    for (let i = 0; i < qTokens; i++) {
      const last = seqLen - qTokens + i;
      const s: number[] = [];
      for (let t = 0; t <= last; t++) {
        let dot = 0;
        for (let j = 0; j < d; j++) {
          dot += q[(h * qTokens + i) * d + j] * k[(kvh * seqLen + t) * d + j];
        }
        s.push(dot / Math.sqrt(d));
      }
      const max = Math.max(...s);
      const w = s.map((x) => Math.exp(x - max));
      const sum = w.reduce((a, b) => a + b, 0);
      for (let j = 0; j < d; j++) {
        let acc = 0;
        for (let t = 0; t <= last; t++) acc += w[t] * v[(kvh * seqLen + t) * d + j];
        out[(h * qTokens + i) * d + j] = acc / sum;
      }
    }
  }
  return out;
}

Deno.test("CpuAttentionBackend: causal GQA across appends and growth", async () => {
  const H = 6, KV = 3, d = 4;
  const backend = new CpuAttentionBackend({
    numLayers: 2,
    numKvHeads: KV,
    headDim: d,
    initialCapacity: 2,
  });
  const seg = [3, 1, 5];
  const ks: Float32Array[] = [];
  const vs: Float32Array[] = [];
  for (const [n, t] of seg.entries()) {
    ks.push(randomArray(KV * t * d, 10 + n));
    vs.push(randomArray(KV * t * d, 20 + n));
    await backend.append(1, ks[n], vs[n]);
  }
  const total = seg.reduce((a, b) => a + b, 0);
  assert.equal(backend.seqLen(1), total);
  assert.equal(backend.seqLen(0), 0);
  assert.ok(backend.capacity(1) >= total);
  // Concatenate the segments head-major, as the backend stores them.
  const full = (parts: Float32Array[]): Float32Array => {
    const out = new Float32Array(KV * total * d);
    let off = 0;
    parts.forEach((p, n) => {
      const t = seg[n];
      for (let h = 0; h < KV; h++) {
        out.set(p.subarray(h * t * d, (h + 1) * t * d), (h * total + off) * d);
      }
      off += t;
    });
    return out;
  };
  const K = full(ks), V = full(vs);
  const stored = await backend.dequantize(1);
  assert.deepEqual(stored.k, K);
  assert.deepEqual(stored.v, V);
  const q = randomArray(H * 4 * d, 99);
  const got = await backend.attention(1, q, { numHeads: H, causal: true });
  const want = naiveAttention(q, K, V, H, KV, d, total);
  for (let i = 0; i < got.length; i++) assert.ok(Math.abs(got[i] - want[i]) < 1e-5);
  await assert.rejects(() => backend.attention(1, q, { numHeads: 4 }));
  await backend.reset();
  assert.equal(backend.seqLen(1), 0);
});

Deno.test("SimulatedCodecBackend: identity codec matches exact, centring is exact too", async () => {
  const KV = 2, d = 4, H = 4;
  const identity = (x: Float32Array): Float32Array => x.slice();
  const shape = { numLayers: 1, numKvHeads: KV, headDim: d };
  const exact = new CpuAttentionBackend(shape);
  const plain = new SimulatedCodecBackend(shape, identity);
  const centred = new SimulatedCodecBackend({ ...shape, keyCentering: true }, identity);
  const seen: ("k" | "v")[] = [];
  const spy = new SimulatedCodecBackend(shape, (x, kind) => {
    seen.push(kind);
    return x.slice();
  });
  for (let n = 0; n < 3; n++) {
    const k = randomArray(KV * 2 * d, 30 + n).map((x) => x + 5); // large shared offset
    const v = randomArray(KV * 2 * d, 40 + n);
    for (const b of [exact, plain, centred, spy]) await b.append(0, k, v);
  }
  assert.deepEqual(seen, ["k", "v", "k", "v", "k", "v"]);
  const q = randomArray(H * 2 * d, 7);
  const ref = await exact.attention(0, q, { numHeads: H });
  assert.deepEqual(await plain.attention(0, q, { numHeads: H }), ref);
  const c = await centred.attention(0, q, { numHeads: H });
  for (let i = 0; i < c.length; i++) assert.ok(Math.abs(c[i] - ref[i]) < 1e-5);
});
