/**
 * Standalone timing of the fused TurboQuant attention in decode (32 query heads over 8 KV heads,
 * headDim 128) at K4/V3 and K3/V3 and contexts 4K and 16K, against the f32 UncompressedKVCache
 * kernel measured in the same run (interleaved, since this machine's speed drifts): GPU time
 * from timestamp queries and wall time per call (submit to done). The TurboQuant rows hold
 * random codes and scales, the f32 cache random keys and values: neither kernel's work depends
 * on the values.
 *
 * Usage: deno run -A bench/tq_attention_probe.ts [--contexts 4096,16384] [--configs 4/3,3/3]
 *        [--iters 8] [--heads 32] [--kv-heads 8] [--head-dim 128] [--no-baseline]
 *        [--unit 2] [--tpl 256]
 *
 * @module
 */

import { TurboQuantCodec } from "../src/codec/codec.ts";
import { describeAdapter, requestTurboQuantDevice } from "../src/gpu/device.ts";
import { createBuffer, GpuTimer } from "../src/gpu/_buffers.ts";
import { TurboQuantAttention } from "../src/attention/_tq_attention.ts";
import { UncompressedKVCache } from "../src/cache/uncompressed_kv_cache.ts";

function arg(name: string, fallback: string): string {
  const i = Deno.args.indexOf(`--${name}`);
  return i >= 0 && i + 1 < Deno.args.length ? Deno.args[i + 1] : fallback;
}

const contexts = arg("contexts", "4096,16384").split(",").map(Number);
const configs = arg("configs", "4/3,3/3").split(",").map((s) => s.split("/").map(Number));
const iters = Number(arg("iters", "8"));
const numHeads = Number(arg("heads", "32"));
const numKvHeads = Number(arg("kv-heads", "8"));
const headDim = Number(arg("head-dim", "128"));
const baseline = !Deno.args.includes("--no-baseline");
const unitBlocks = Deno.args.includes("--unit") ? Number(arg("unit", "2")) : undefined;
const tokensPerLane = Deno.args.includes("--tpl") ? Number(arg("tpl", "256")) : undefined;

const device = await requestTurboQuantDevice();
console.log(`adapter: ${describeAdapter(device).description}`);

function randomWords(n: number, seed: number): Uint32Array {
  const out = new Uint32Array(n);
  let a = seed >>> 0;
  for (let i = 0; i < n; i++) {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out[i] = (t ^ (t >>> 14)) >>> 0;
  }
  return out;
}

/** Words of positive f16 scales in [0.5, 1.5). */
function scaleWords(n: number, seed: number): Uint32Array {
  const r = randomWords(n, seed);
  const f = new Float16Array(2 * n);
  for (let i = 0; i < 2 * n; i++) f[i] = 0.5 + ((r[i >> 1] >>> (16 * (i & 1))) & 0xffff) / 65536;
  return new Uint32Array(f.buffer);
}

const med = (a: number[]) => [...a].sort((x, y) => x - y)[a.length >> 1];
const min = (a: number[]) => Math.min(...a);
const H = numKvHeads;
const scale = 1 / Math.sqrt(headDim);

const variants = await Promise.all(configs.map(async ([kb, vb]) => {
  const keyCodec = new TurboQuantCodec({ headDim, bits: kb });
  const valueCodec = new TurboQuantCodec({ headDim, bits: vb });
  const t0 = performance.now();
  const attn = await TurboQuantAttention.create(device, keyCodec, valueCodec, H, {
    group: numHeads / H,
    unitBlocks,
    tokensPerLane,
  });
  return { name: `K${kb}/V${vb}`, keyCodec, valueCodec, attn, createMs: performance.now() - t0 };
}));

for (const seqLen of contexts) {
  const qData = new Float32Array(numHeads * headDim).map((_, i) => Math.sin(i * 0.37));
  const q = createBuffer(device, "probe/q", qData.byteLength, undefined, qData);
  const out = createBuffer(device, "probe/out", qData.byteLength);
  const runs = variants.map((v) => {
    const kw = H * v.keyCodec.wordsPerVector, vw = H * v.valueCodec.wordsPerVector;
    const sw = Math.ceil((H * v.keyCodec.numBlocks) / 2);
    const make = (label: string, data: Uint32Array) =>
      createBuffer(device, `probe/${label}`, data.byteLength, GPUBufferUsage.STORAGE, data);
    const rows = {
      kIndex: make("k", randomWords(seqLen * kw, 1)),
      kScales: make("ks", scaleWords(seqLen * sw, 2)),
      vIndex: make("v", randomWords(seqLen * vw, 3)),
      vScales: make("vs", scaleWords(seqLen * sw, 4)),
    };
    return { ...v, rows, gpu: [] as number[], wall: [] as number[], firstMs: 0 };
  });
  let f32: UncompressedKVCache | null = null;
  const f32Gpu: number[] = [], f32Wall: number[] = [];
  if (baseline) {
    f32 = new UncompressedKVCache(device, {
      numLayers: 1,
      numKvHeads: H,
      headDim,
      dtype: "f32",
      timings: true,
    });
    const bytes = H * seqLen * headDim * 4;
    const kv = createBuffer(device, "probe/f32-kv", bytes);
    await f32.appendBuffers(0, kv, kv, seqLen);
    kv.destroy();
  }
  for (let it = 0; it <= iters; it++) {
    for (const r of runs) {
      const timer = new GpuTimer(device, 16);
      const encoder = device.createCommandEncoder();
      r.attn.record(encoder, r.rows, seqLen, q, out, {
        numHeads,
        qTokens: 1,
        scale,
        causal: true,
        timer,
      });
      timer.resolve(encoder);
      const w0 = performance.now();
      device.queue.submit([encoder.finish()]);
      await device.queue.onSubmittedWorkDone();
      const w1 = performance.now();
      const ms = await timer.readMs();
      r.attn.releaseTransient();
      timer.destroy();
      if (it === 0) {
        r.firstMs = w1 - w0; // includes the lazy part of the compile
        continue;
      }
      if (ms) r.gpu.push(ms.reduce((a, b) => a + b, 0));
      r.wall.push(w1 - w0);
    }
    if (f32) {
      const w0 = performance.now();
      await f32.attentionBuffers(0, q, { numHeads, qTokens: 1, causal: true, out });
      const w1 = performance.now();
      if (it > 0) {
        if (f32.lastGpuTimeMs !== null) f32Gpu.push(f32.lastGpuTimeMs);
        f32Wall.push(w1 - w0);
      }
    }
  }
  if (f32Gpu.length) {
    console.log(
      `f32 baseline ctx ${seqLen}: GPU min ${min(f32Gpu).toFixed(2)} median ${
        med(f32Gpu).toFixed(2)
      } ms, wall median ${med(f32Wall).toFixed(2)} ms`,
    );
  }
  for (const r of runs) {
    const ratio = f32Gpu.length
      ? ` (${(med(f32Gpu) / med(r.gpu)).toFixed(1)}x the f32 median)`
      : "";
    console.log(
      `${r.name} ctx ${seqLen}: GPU min ${min(r.gpu).toFixed(2)} median ${
        med(r.gpu).toFixed(2)
      } ms` +
        `${ratio}, wall median ${med(r.wall).toFixed(2)} ms; create ${r.createMs.toFixed(0)} ms,` +
        ` first call ${r.firstMs.toFixed(0)} ms; plan ${
          JSON.stringify(r.attn.plan(seqLen, numHeads, 1))
        }`,
    );
    for (const b of Object.values(r.rows)) b.destroy();
  }
  f32?.destroy();
  q.destroy();
  out.destroy();
}
for (const v of variants) v.attn.destroy();
device.destroy();
