/**
 * The fused TurboQuant attention kernel against a CPU reference computed from the same codes:
 * scores from `codec.dot` (the decoded keys, plus the QJL estimate in prod mode), values from
 * `codec.decode`, softmax in f64. Cache rows are laid out by hand from `codec.encode`
 * (bit-identical to the GPU encoder), in the storage layout of DESIGN.md section 3.
 */

import assert from "node:assert/strict";
import { type EncodedVectors, TurboQuantCodec } from "../src/codec/codec.ts";
import { createBuffer, readBuffer } from "../src/gpu/_buffers.ts";
import { type TqAttentionRows, TurboQuantAttention } from "../src/attention/_tq_attention.ts";
import { assertRelativeError, gpuTest, type GpuTestContext, Rng } from "./_helpers.ts";

const TOL = 1e-4;

interface Config {
  headDim: number;
  kvHeads: number;
  kBits: number;
  vBits: number;
  prod?: boolean;
  /** Specialise a pipeline for this group size too. */
  group?: number;
}

/** One layer of cache built on the CPU: per-head codes, and the rows on the GPU. */
interface Layer {
  seqLen: number;
  keys: EncodedVectors[]; // per KV head
  values: Float32Array[]; // decoded, per KV head, [seqLen][headDim]
  rows: TqAttentionRows;
}

const attentions = new Map<string, Promise<TurboQuantAttention>>();

function codecs(c: Config): { kc: TurboQuantCodec; vc: TurboQuantCodec } {
  // One scale candidate keeps the CPU encoding of long caches fast; decoding is unchanged.
  const kc = new TurboQuantCodec({
    headDim: c.headDim,
    bits: c.kBits,
    mode: c.prod ? "prod" : "mse",
    seed: 7,
    scaleSearch: 1,
  });
  const vc = new TurboQuantCodec({ headDim: c.headDim, bits: c.vBits, seed: 7, scaleSearch: 1 });
  return { kc, vc };
}

/** One TurboQuantAttention per config and file (pipelines compile once). */
async function attentionFor(device: GPUDevice, c: Config): Promise<{
  attn: TurboQuantAttention;
  kc: TurboQuantCodec;
  vc: TurboQuantCodec;
}> {
  const key = JSON.stringify(c);
  let p = attentions.get(key);
  if (!p) {
    const { kc, vc } = codecs(c);
    p = TurboQuantAttention.create(device, kc, vc, c.kvHeads, { group: c.group });
    attentions.set(key, p);
  }
  const attn = await p;
  return { attn, kc: attn.keyCodec, vc: attn.valueCodec };
}

/** Token-major rows of per-head encodings: [token][head][words]. */
function interleave(per: Uint32Array[], wordsPerVector: number, seqLen: number): Uint32Array {
  const H = per.length;
  const out = new Uint32Array(Math.max(1, seqLen * H * wordsPerVector));
  for (let t = 0; t < seqLen; t++) {
    for (let h = 0; h < H; h++) {
      out.set(
        per[h].subarray(t * wordsPerVector, (t + 1) * wordsPerVector),
        (t * H + h) * wordsPerVector,
      );
    }
  }
  return out;
}

/** f16 rows: token t has ceil(H * n / 2) words; value k = h * n + b at half k % 2 of word k / 2. */
function halfRows(per: Uint16Array[], perVector: number, seqLen: number): Uint32Array {
  const H = per.length;
  const words = Math.ceil((H * perVector) / 2);
  const out = new Uint32Array(Math.max(1, seqLen * words));
  for (let t = 0; t < seqLen; t++) {
    for (let h = 0; h < H; h++) {
      for (let b = 0; b < perVector; b++) {
        const k = h * perVector + b;
        out[t * words + (k >> 1)] |= per[h][t * perVector + b] << (16 * (k & 1));
      }
    }
  }
  return out;
}

/** Encodes k and v ([kvHeads][seqLen][headDim]) and uploads the rows. */
function buildLayer(
  ctx: GpuTestContext,
  kc: TurboQuantCodec,
  vc: TurboQuantCodec,
  H: number,
  k: Float32Array,
  v: Float32Array,
): Layer {
  const d = kc.headDim;
  const seqLen = k.length / (H * d);
  const keys: EncodedVectors[] = [], vEnc: EncodedVectors[] = [], values: Float32Array[] = [];
  for (let h = 0; h < H; h++) {
    keys.push(kc.encode(k.subarray(h * seqLen * d, (h + 1) * seqLen * d)));
    vEnc.push(vc.encode(v.subarray(h * seqLen * d, (h + 1) * seqLen * d)));
    values.push(vc.decode(vEnc[h]));
  }
  const upload = (label: string, data: Uint32Array) =>
    ctx.track(createBuffer(ctx.device, `test/${label}`, data.byteLength, undefined, data));
  const rows: TqAttentionRows = {
    kIndex: upload("k", interleave(keys.map((e) => e.indices), kc.wordsPerVector, seqLen)),
    kScales: upload("ks", halfRows(keys.map((e) => e.scales), kc.numBlocks, seqLen)),
    vIndex: upload("v", interleave(vEnc.map((e) => e.indices), vc.wordsPerVector, seqLen)),
    vScales: upload("vs", halfRows(vEnc.map((e) => e.scales), vc.numBlocks, seqLen)),
  };
  if (kc.mode === "prod") {
    rows.kSigns = upload(
      "sg",
      interleave(keys.map((e) => e.signs!), kc.signWordsPerVector, seqLen),
    );
    rows.kNorms = upload("nm", halfRows(keys.map((e) => e.residualNorms!), 1, seqLen));
  }
  return { seqLen, keys, values, rows };
}

function sliceEncoded(kc: TurboQuantCodec, e: EncodedVectors, n: number): EncodedVectors {
  return {
    count: n,
    indices: e.indices.slice(0, n * kc.wordsPerVector),
    scales: e.scales.slice(0, n * kc.numBlocks),
    signs: e.signs?.slice(0, n * kc.signWordsPerVector),
    residualNorms: e.residualNorms?.slice(0, n),
  };
}

/** Attention on the CPU over the same codes: [numHeads][qTokens][headDim]. */
function reference(
  kc: TurboQuantCodec,
  layer: Layer,
  q: Float32Array,
  numHeads: number,
  scale: number,
  causal: boolean,
  seqLen = layer.seqLen,
): Float32Array {
  const d = kc.headDim;
  const H = layer.keys.length;
  const group = numHeads / H;
  const qTokens = q.length / (numHeads * d);
  const out = new Float32Array(q.length);
  const acc = new Float64Array(d);
  for (let h = 0; h < numHeads; h++) {
    const kv = Math.floor(h / group);
    const e = layer.keys[kv];
    const keys = seqLen === layer.seqLen ? e : sliceEncoded(kc, e, seqLen);
    for (let i = 0; i < qTokens; i++) {
      const qv = q.subarray((h * qTokens + i) * d, (h * qTokens + i + 1) * d);
      const scores = kc.dot(qv, keys);
      const visible = causal ? seqLen - qTokens + i + 1 : seqLen;
      let max = -Infinity;
      for (let t = 0; t < visible; t++) max = Math.max(max, scores[t] * scale);
      acc.fill(0);
      let sum = 0;
      for (let t = 0; t < visible; t++) {
        const p = Math.exp(scores[t] * scale - max);
        sum += p;
        const vb = t * d;
        for (let j = 0; j < d; j++) acc[j] += p * layer.values[kv][vb + j];
      }
      for (let j = 0; j < d; j++) out[(h * qTokens + i) * d + j] = acc[j] / sum;
    }
  }
  return out;
}

/** Runs the kernel: q [numHeads][qTokens][headDim] -> output of the same shape. */
async function runGpu(
  ctx: GpuTestContext,
  attn: TurboQuantAttention,
  layer: Layer,
  q: Float32Array,
  o: { numHeads: number; scale: number; causal: boolean; seqLen?: number },
): Promise<Float32Array> {
  const { device } = ctx;
  const qTokens = q.length / (o.numHeads * attn.keyCodec.headDim);
  const qBuf = ctx.track(createBuffer(device, "test/q", q.byteLength, undefined, q));
  const out = ctx.track(createBuffer(device, "test/out", q.byteLength));
  const encoder = device.createCommandEncoder();
  attn.record(encoder, layer.rows, o.seqLen ?? layer.seqLen, qBuf, out, {
    numHeads: o.numHeads,
    qTokens,
    scale: o.scale,
    causal: o.causal,
  });
  device.queue.submit([encoder.finish()]);
  attn.releaseTransient();
  return new Float32Array(await readBuffer(device, out, 0, q.byteLength));
}

/** Random K/V with some structure (per-channel offsets and scales, as real keys have). */
function randomKV(rng: Rng, H: number, seqLen: number, d: number) {
  const k = rng.gaussians(H * seqLen * d);
  const v = rng.gaussians(H * seqLen * d);
  for (let i = 0; i < k.length; i++) k[i] = k[i] * (1 + ((i % d) % 5)) + ((i % d) % 3) - 1;
  return { k, v };
}

async function checkCase(
  ctx: GpuTestContext,
  c: Config,
  seqLen: number,
  numHeads: number,
  qTokens: number,
  causal: boolean,
  seed: number,
  layers: Map<number, Layer>,
): Promise<void> {
  const { attn, kc, vc } = await attentionFor(ctx.device, c);
  const d = c.headDim;
  const rng = new Rng(seed);
  let layer = layers.get(seqLen);
  if (!layer) {
    const { k, v } = randomKV(rng, c.kvHeads, seqLen, d);
    layer = buildLayer(ctx, kc, vc, c.kvHeads, k, v);
    layers.set(seqLen, layer);
  }
  // Queries scaled so that softmax is neither flat nor one-hot.
  const q = rng.gaussians(numHeads * qTokens * d, 1.5);
  const scale = 1 / Math.sqrt(d);
  const got = await runGpu(ctx, attn, layer, q, { numHeads, scale, causal });
  const want = reference(kc, layer, q, numHeads, scale, causal);
  assertRelativeError(
    got,
    want,
    TOL,
    `${
      JSON.stringify(c)
    } seqLen ${seqLen} numHeads ${numHeads} qTokens ${qTokens} causal ${causal}`,
  );
}

/** [numHeads][qTokens][d] -> the rows of query token i, [numHeads][1][d]. */
function queryToken(q: Float32Array, numHeads: number, qTokens: number, d: number, i: number) {
  const out = new Float32Array(numHeads * d);
  for (let h = 0; h < numHeads; h++) {
    out.set(q.subarray((h * qTokens + i) * d, (h * qTokens + i + 1) * d), h * d);
  }
  return out;
}

const LENGTHS = [1, 127, 128, 129, 4096];

gpuTest(
  "tq attention: headDim 64, 8 heads over 2 (K4/V3), decode and causal prefill",
  async (ctx) => {
    const c: Config = { headDim: 64, kvHeads: 2, kBits: 4, vBits: 3 };
    const layers = new Map<number, Layer>();
    for (const n of LENGTHS) {
      await checkCase(ctx, c, n, 8, 1, true, n, layers);
      await checkCase(ctx, c, n, 8, Math.min(n, 5), true, n + 1, layers);
      if (n <= 129) await checkCase(ctx, c, n, 8, n, true, n + 2, layers); // full prefill
    }
  },
);

gpuTest("tq attention: headDim 128, 8 heads over 2 (K3/V4), decode and prefill", async (ctx) => {
  const c: Config = { headDim: 128, kvHeads: 2, kBits: 3, vBits: 4 };
  const layers = new Map<number, Layer>();
  for (const n of LENGTHS) {
    await checkCase(ctx, c, n, 8, 1, true, 10 + n, layers);
    await checkCase(ctx, c, n, 8, Math.min(n, 3), true, 11 + n, layers);
  }
  await checkCase(ctx, c, 129, 8, 129, true, 12, layers);
});

gpuTest(
  "tq attention: 8 heads over 8 KV heads, headDim 64 (K6/V5) and 128 (K8/V2)",
  async (ctx) => {
    const configs: Config[] = [
      // headDim 64 also gets the pipeline specialised for one row per workgroup.
      { headDim: 64, kvHeads: 8, kBits: 6, vBits: 5, group: 1 },
      { headDim: 128, kvHeads: 8, kBits: 8, vBits: 2 },
    ];
    for (const c of configs) {
      const layers = new Map<number, Layer>();
      for (const n of LENGTHS) {
        await checkCase(ctx, c, n, 8, 1, true, 20 + n, layers);
        await checkCase(ctx, c, n, 8, Math.min(n, 4), true, 21 + n, layers);
      }
      await checkCase(ctx, c, 128, 8, 128, true, 22, layers);
    }
  },
);

gpuTest("tq attention: 70,000 tokens (past Mesa's 65,535-iteration loop budget)", async (ctx) => {
  const c: Config = { headDim: 64, kvHeads: 2, kBits: 4, vBits: 3 };
  const layers = new Map<number, Layer>();
  await checkCase(ctx, c, 70000, 8, 1, true, 70000, layers);
  await checkCase(ctx, c, 70000, 8, 3, true, 70001, layers);
  await checkCase(ctx, c, 70000, 8, 2, false, 70002, layers);
});

gpuTest("tq attention: prod key mode (QJL residual sketch), K5/V7", async (ctx) => {
  const c: Config = { headDim: 64, kvHeads: 2, kBits: 5, vBits: 7, prod: true };
  const layers = new Map<number, Layer>();
  for (const n of [1, 129, 4096]) {
    await checkCase(ctx, c, n, 8, 1, true, 30 + n, layers);
    await checkCase(ctx, c, n, 8, Math.min(n, 3), true, 31 + n, layers);
    await checkCase(ctx, c, n, 8, Math.min(n, 2), false, 32 + n, layers);
  }
});

// With the configurations above, K and V each take every width from 2 to 8 bits.
gpuTest("tq attention: K and V bits mixed (K2/V8, K7/V6)", async (ctx) => {
  for (const [kBits, vBits] of [[2, 8], [7, 6]]) {
    const c: Config = { headDim: 64, kvHeads: 2, kBits, vBits };
    const layers = new Map<number, Layer>();
    await checkCase(ctx, c, 300, 8, 1, true, 40 + kBits, layers);
    await checkCase(ctx, c, 300, 8, 2, false, 50 + kBits, layers);
  }
});

gpuTest(
  "tq attention: an appended token with a high score gives its decoded value",
  async (ctx) => {
    const c: Config = { headDim: 64, kvHeads: 2, kBits: 4, vBits: 3 };
    const { attn, kc, vc } = await attentionFor(ctx.device, c);
    const d = 64, H = 2, n = 1000, numHeads = 8;
    const rng = new Rng(60);
    const { k, v } = randomKV(rng, H, n, d);
    // Every query head of a group asks the same query; the last token's key is that query, long.
    const q = rng.gaussians(numHeads * d);
    for (let h = 0; h < numHeads; h++) {
      const lead = Math.floor(h / 4) * 4;
      q.copyWithin(h * d, lead * d, lead * d + d);
    }
    for (let h = 0; h < H; h++) {
      for (let i = 0; i < d; i++) k[(h * n + n - 1) * d + i] = 40 * q[h * 4 * d + i];
    }
    const layer = buildLayer(ctx, kc, vc, H, k, v);
    const got = await runGpu(ctx, attn, layer, q, {
      numHeads,
      scale: 1 / Math.sqrt(d),
      causal: true,
    });
    for (let h = 0; h < numHeads; h++) {
      const want = layer.values[Math.floor(h / 4)].subarray((n - 1) * d, n * d);
      assertRelativeError(got.subarray(h * d, h * d + d), want, 1e-5, `head ${h}`);
    }
  },
);

gpuTest(
  "tq attention: decode of the last position equals the last row of a prefill",
  async (ctx) => {
    const c: Config = { headDim: 64, kvHeads: 2, kBits: 4, vBits: 3 };
    const { attn, kc, vc } = await attentionFor(ctx.device, c);
    const d = 64, H = 2, n = 777, numHeads = 8, Q = 9;
    const rng = new Rng(61);
    const { k, v } = randomKV(rng, H, n, d);
    const layer = buildLayer(ctx, kc, vc, H, k, v);
    const q = rng.gaussians(numHeads * Q * d);
    const scale = 1 / Math.sqrt(d);
    const prefill = await runGpu(ctx, attn, layer, q, { numHeads, scale, causal: true });
    const last = await runGpu(ctx, attn, layer, queryToken(q, numHeads, Q, d, Q - 1), {
      numHeads,
      scale,
      causal: true,
    });
    assertRelativeError(last, queryToken(prefill, numHeads, Q, d, Q - 1), 1e-5, "last row");
    // The first query of the prefill is a decode over the first n - Q + 1 tokens.
    const first = await runGpu(ctx, attn, layer, queryToken(q, numHeads, Q, d, 0), {
      numHeads,
      scale,
      causal: true,
      seqLen: n - Q + 1,
    });
    assertRelativeError(first, queryToken(prefill, numHeads, Q, d, 0), 1e-5, "first row");
  },
);

gpuTest("tq attention: non-causal query alone equals it inside a batch of 4", async (ctx) => {
  const c: Config = { headDim: 64, kvHeads: 2, kBits: 4, vBits: 3 };
  const { attn, kc, vc } = await attentionFor(ctx.device, c);
  const d = 64, H = 2, n = 513, numHeads = 8;
  const rng = new Rng(62);
  const { k, v } = randomKV(rng, H, n, d);
  const layer = buildLayer(ctx, kc, vc, H, k, v);
  const q = rng.gaussians(numHeads * 4 * d);
  const scale = 1 / Math.sqrt(d);
  const batch = await runGpu(ctx, attn, layer, q, { numHeads, scale, causal: false });
  for (let i = 0; i < 4; i++) {
    const alone = await runGpu(ctx, attn, layer, queryToken(q, numHeads, 4, d, i), {
      numHeads,
      scale,
      causal: false,
    });
    assertRelativeError(alone, queryToken(batch, numHeads, 4, d, i), 1e-5, `query ${i}`);
  }
});

gpuTest("tq attention: small binding windows and row groups give the same result", async (ctx) => {
  const c: Config = { headDim: 64, kvHeads: 2, kBits: 4, vBits: 3 };
  const { kc, vc } = codecs(c);
  const small = ctx.track(
    await TurboQuantAttention.create(ctx.device, kc, vc, 2, {
      maxWindowBytes: 64 * 1024,
      maxPartialBytes: 4096,
      targetWorkgroups: 256,
    }),
  );
  const d = 64, H = 2, n = 5000, numHeads = 8, Q = 6;
  const rng = new Rng(63);
  const { k, v } = randomKV(rng, H, n, d);
  const layer = buildLayer(ctx, kc, vc, H, k, v);
  const plan = small.plan(n, numHeads, Q);
  assert.ok(plan.windowTokens < n, `several windows (${JSON.stringify(plan)})`);
  assert.ok(plan.groupRows < (numHeads / H) * Q, `several row groups (${JSON.stringify(plan)})`);
  const q = rng.gaussians(numHeads * Q * d, 1.5);
  const scale = 1 / Math.sqrt(d);
  const got = await runGpu(ctx, small, layer, q, { numHeads, scale, causal: true });
  assertRelativeError(got, reference(kc, layer, q, numHeads, scale, true), TOL, "small windows");
});

gpuTest("tq attention: records through a cache job (recorder with scratch)", async (ctx) => {
  const c: Config = { headDim: 64, kvHeads: 2, kBits: 4, vBits: 3 };
  const { attn, kc, vc } = await attentionFor(ctx.device, c);
  const { device } = ctx;
  const d = 64, H = 2, n = 300, numHeads = 8;
  const rng = new Rng(64);
  const { k, v } = randomKV(rng, H, n, d);
  const layer = buildLayer(ctx, kc, vc, H, k, v);
  const q = rng.gaussians(numHeads * d, 1.5);
  const qBuf = ctx.track(createBuffer(device, "test/q", q.byteLength, undefined, q));
  const out = ctx.track(createBuffer(device, "test/out", q.byteLength));
  const encoder = device.createCommandEncoder();
  const scratch: GPUBuffer[] = [];
  const labels: string[] = [];
  const job = {
    encoder,
    beginComputePass(label: string) {
      labels.push(label);
      return encoder.beginComputePass({ label });
    },
    scratch(label: string, size: number, usage = GPUBufferUsage.STORAGE, data?: ArrayBufferView) {
      const b = createBuffer(device, label, size, usage, data);
      scratch.push(b);
      return b;
    },
  };
  const scale = 1 / Math.sqrt(d);
  attn.record(job, layer.rows, n, qBuf, out, { numHeads, qTokens: 1, scale, causal: true });
  device.queue.submit([encoder.finish()]);
  const got = new Float32Array(await readBuffer(device, out, 0, q.byteLength));
  for (const b of scratch) b.destroy();
  assert.equal(scratch.length, 1, "one uniform buffer from the job's scratch");
  assert.deepEqual(labels, [
    "turboquant/tq-rotate-query",
    "turboquant/tq-attention",
    "turboquant/tq-attention-reduce",
  ]);
  assertRelativeError(got, reference(kc, layer, q, numHeads, scale, true), TOL, "recorder");
});

gpuTest("tq attention: rejects bad calls", async (ctx) => {
  const c: Config = { headDim: 64, kvHeads: 2, kBits: 4, vBits: 3 };
  const { attn } = await attentionFor(ctx.device, c);
  const buf = ctx.track(createBuffer(ctx.device, "test/x", 4096));
  const rows = { kIndex: buf, kScales: buf, vIndex: buf, vScales: buf };
  const encoder = ctx.device.createCommandEncoder();
  const o = { numHeads: 8, qTokens: 1, scale: 1, causal: true };
  assert.throws(() => attn.record(encoder, rows, 10, buf, buf, { ...o, numHeads: 7 }), /numHeads/);
  assert.throws(() => attn.record(encoder, rows, 0, buf, buf, o), /qTokens/);
  assert.throws(() => attn.record(encoder, rows, 4, buf, buf, { ...o, qTokens: 5 }), /qTokens/);
  encoder.finish();
});
