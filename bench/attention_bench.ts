/**
 * Decode attention benchmarks: headDim 128, 32 query heads over 8 KV heads, contexts 1K, 4K and
 * 16K. One group per context: the CPU reference (baseline), the uncompressed f32 and f16 GPU
 * caches, the TurboQuant cache (fused kernel over the packed codes) at K4/V3 (the default) and
 * K3/V3, and a plain copy kernel of the same bytes (the roofline). Wall times come from
 * Deno.bench (submit to done, ~12 ms of it fixed cost on software adapters); GPU times from
 * timestamp queries are printed beside them at the end, with the roofline estimate
 * (bytes the kernel must read / copy-kernel read bandwidth).
 *
 * Run: `deno task bench` or `deno bench -A bench/attention_bench.ts`.
 *
 * @module
 */

import { cpuAttention } from "../src/attention/cpu_reference.ts";
import { UncompressedKVCache } from "../src/cache/uncompressed_kv_cache.ts";
import { TurboQuantKVCache } from "../src/cache/turboquant_kv_cache.ts";
import { TurboQuantCodec } from "../src/codec/codec.ts";
import { describeAdapter, requestTurboQuantDevice } from "../src/gpu/device.ts";
import { createBuffer, GpuTimer } from "../src/gpu/_buffers.ts";
import { composeShader, getPipeline } from "../src/gpu/_pipelines.ts";
import { uniformLayout } from "../src/gpu/_uniforms.ts";
import { COPY_WGSL } from "../src/_shaders/copy.ts";

const HEAD_DIM = 128;
const NUM_HEADS = 32;
const NUM_KV_HEADS = 8;
const CONTEXTS = (Deno.env.get("TQ_BENCH_CONTEXTS") ?? "1024,4096,16384").split(",").map(Number);
/** Iterations per GPU case (each at least one submit-to-done). */
const ITERS = 5;

const device = await requestTurboQuantDevice();
const adapter = describeAdapter(device);
console.log(
  `adapter: ${adapter.description} (${Deno.env.get("DENO_WEBGPU_BACKEND") ?? "default"} backend; ` +
    `features: ${adapter.features.join(", ")})`,
);

// Memory: bytes per token of an 8B-class model (32 layers, 8 KV heads, headDim 128), K + V.
{
  const layers = 32;
  const perValue = (bits: number) => new TurboQuantCodec({ headDim: HEAD_DIM, bits }).bitsPerValue;
  const rows: [string, number][] = [
    ["f32", 32],
    ["f16", 16],
    ["TurboQuant 4-bit", perValue(4)],
    ["TurboQuant K4/V3", (perValue(4) + perValue(3)) / 2],
    ["TurboQuant 3-bit", perValue(3)],
    ["TurboQuant 2-bit", perValue(2)],
  ];
  console.log("memory, 32 layers x 8 KV heads x headDim 128 (K + V):");
  for (const [name, bits] of rows) {
    const bytes = (2 * layers * NUM_KV_HEADS * HEAD_DIM * bits) / 8;
    console.log(
      `  ${name.padEnd(18)} ${bits.toFixed(2).padStart(5)} bits/value  ${
        bytes.toFixed(0).padStart(6)
      } ` +
        `bytes/token  ${
          Math.floor(2 ** 30 / bytes).toLocaleString("en-US").padStart(7)
        } tokens in 1 GiB`,
    );
  }
}

/** Deterministic pseudo-random values in [-1, 1) (an LCG: fast for 16M values). */
function values(n: number, seed: number): Float32Array {
  const out = new Float32Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s / 2147483648 - 1;
  }
  return out;
}

/** GPU milliseconds per case (min over iterations), printed at the end. */
const gpuTimes = new Map<string, number[]>();
function recordGpu(name: string, ms: number | null): void {
  if (ms === null) return;
  const list = gpuTimes.get(name) ?? [];
  list.push(ms);
  gpuTimes.set(name, list);
}
const minOf = (xs: number[] | undefined): number => xs ? Math.min(...xs) : NaN;

// ---- the copy kernel (roofline) ---------------------------------------------------------

const COPY_PARAMS = uniformLayout({ n: "u32", groups_x: "u32" });
const copyPipeline = await getPipeline(device, {
  label: "turboquant/bench-copy",
  code: composeShader({}, COPY_WGSL),
});

/** Copies `bytes` with the copy kernel; returns GPU ms (null without timestamps). */
async function runCopy(src: GPUBuffer, dst: GPUBuffer, bytes: number): Promise<number | null> {
  const words = bytes / 16;
  const groups = Math.ceil(words / 64);
  const gx = Math.min(groups, 65535);
  const uniform = createBuffer(
    device,
    "turboquant/bench-copy-params",
    COPY_PARAMS.size,
    GPUBufferUsage.UNIFORM,
    COPY_PARAMS.pack({ n: words, groups_x: gx }),
  );
  const timer = new GpuTimer(device, 1);
  const encoder = device.createCommandEncoder({ label: "turboquant/bench-copy" });
  const pass = encoder.beginComputePass({ timestampWrites: timer.passTimestamps() });
  pass.setPipeline(copyPipeline);
  pass.setBindGroup(
    0,
    device.createBindGroup({
      label: "turboquant/bench-copy",
      layout: copyPipeline.getBindGroupLayout(0),
      entries: [
        { binding: 0, resource: { buffer: uniform } },
        { binding: 1, resource: { buffer: src, size: bytes } },
        { binding: 2, resource: { buffer: dst, size: bytes } },
      ],
    }),
  );
  pass.dispatchWorkgroups(gx, Math.ceil(groups / gx));
  pass.end();
  timer.resolve(encoder);
  device.queue.submit([encoder.finish()]);
  await device.queue.onSubmittedWorkDone();
  const ms = await timer.readMs();
  timer.destroy();
  uniform.destroy();
  return ms ? ms[0] : null;
}

// ---- per context ------------------------------------------------------------------------

interface Case {
  context: number;
  k: Float32Array;
  v: Float32Array;
  q: Float32Array;
  qBuffer: GPUBuffer;
  out: GPUBuffer;
  caches: Record<"f32" | "f16", UncompressedKVCache>;
  tq: Record<TqName, TurboQuantKVCache>;
}

/** The TurboQuant settings benchmarked: [keyBits, valueBits]. */
const TQ = { "K4/V3": [4, 3], "K3/V3": [3, 3] } as const;
type TqName = keyof typeof TQ;
const TQ_NAMES = Object.keys(TQ) as TqName[];

const cases: Case[] = [];
for (const context of CONTEXTS) {
  const n = NUM_KV_HEADS * context * HEAD_DIM;
  const k = values(n, context);
  const v = values(n, context + 1);
  const q = values(NUM_HEADS * HEAD_DIM, context + 2);
  const caches = {} as Case["caches"];
  for (const dtype of ["f32", "f16"] as const) {
    const cache = new UncompressedKVCache(device, {
      numLayers: 1,
      numKvHeads: NUM_KV_HEADS,
      headDim: HEAD_DIM,
      dtype,
      timings: true,
    });
    await cache.append(0, k, v);
    caches[dtype] = cache;
  }
  const tq = {} as Case["tq"];
  for (const name of TQ_NAMES) {
    const [keyBits, valueBits] = TQ[name];
    const cache = new TurboQuantKVCache(device, {
      numLayers: 1,
      numKvHeads: NUM_KV_HEADS,
      headDim: HEAD_DIM,
      keyBits,
      valueBits,
      timings: true,
    });
    await cache.append(0, k, v);
    tq[name] = cache;
  }
  cases.push({
    tq,
    context,
    k,
    v,
    q,
    qBuffer: createBuffer(device, "turboquant/bench-q", q.byteLength, undefined, q),
    out: createBuffer(device, "turboquant/bench-out", q.byteLength),
    caches,
  });
}

for (const c of cases) {
  const group = `decode ${c.context / 1024}K (hd ${HEAD_DIM}, ${NUM_HEADS}/${NUM_KV_HEADS} heads)`;
  const heavy = c.context >= 16384;
  Deno.bench({
    name: `cpu reference ${c.context}`,
    group,
    baseline: true,
    n: heavy ? 2 : ITERS,
    warmup: heavy ? 0 : 1,
    fn() {
      cpuAttention(c.q, c.k, c.v, {
        numHeads: NUM_HEADS,
        numKvHeads: NUM_KV_HEADS,
        headDim: HEAD_DIM,
      });
    },
  });
  for (const dtype of ["f32", "f16"] as const) {
    const name = `uncompressed ${dtype} ${c.context}`;
    Deno.bench({
      name,
      group,
      n: ITERS,
      warmup: 1,
      async fn() {
        const cache = c.caches[dtype];
        // attentionBuffers resolves after the GPU time was read (timings on): submit to done.
        await cache.attentionBuffers(0, c.qBuffer, {
          numHeads: NUM_HEADS,
          qTokens: 1,
          out: c.out,
        });
        recordGpu(name, cache.lastGpuTimeMs);
      },
    });
  }
  for (const tqName of TQ_NAMES) {
    const name = `turboquant ${tqName} ${c.context}`;
    Deno.bench({
      name,
      group,
      n: ITERS,
      warmup: 1,
      async fn() {
        const cache = c.tq[tqName];
        await cache.attentionBuffers(0, c.qBuffer, { numHeads: NUM_HEADS, qTokens: 1, out: c.out });
        recordGpu(name, cache.lastGpuTimeMs);
      },
    });
  }
  // The same K+V bytes as the f32 cache, through the copy kernel (read + write).
  const bytes = 2 * NUM_KV_HEADS * c.context * HEAD_DIM * 4;
  const src = createBuffer(device, "turboquant/bench-copy-src", bytes);
  const dst = createBuffer(device, "turboquant/bench-copy-dst", bytes);
  Deno.bench({
    name: `copy kernel ${bytes >> 20} MiB ${c.context}`,
    group,
    n: ITERS,
    warmup: 1,
    async fn() {
      recordGpu(`copy ${c.context}`, await runCopy(src, dst, bytes));
    },
  });
}

// Prefill: 512 causal queries over a 4K context (the last 512 positions).
const PREFILL = 512;
if (Deno.env.get("TQ_BENCH_PREFILL") !== "0") {
  const context = 4096;
  const n = NUM_KV_HEADS * context * HEAD_DIM;
  const k = values(n, 7), v = values(n, 8);
  const q = values(NUM_HEADS * PREFILL * HEAD_DIM, 9);
  const f32 = new UncompressedKVCache(device, {
    numLayers: 1,
    numKvHeads: NUM_KV_HEADS,
    headDim: HEAD_DIM,
    timings: true,
  });
  const tq = new TurboQuantKVCache(device, {
    numLayers: 1,
    numKvHeads: NUM_KV_HEADS,
    headDim: HEAD_DIM,
    timings: true,
  });
  await f32.append(0, k, v);
  await tq.append(0, k, v);
  const qBuffer = createBuffer(device, "turboquant/bench-prefill-q", q.byteLength, undefined, q);
  const out = createBuffer(device, "turboquant/bench-prefill-out", q.byteLength);
  const group = `prefill ${PREFILL} queries over 4K (causal)`;
  for (const [name, cache] of [["uncompressed f32", f32], ["turboquant K4/V3", tq]] as const) {
    Deno.bench({
      name: `${name} prefill`,
      group,
      baseline: name === "uncompressed f32",
      n: 3,
      warmup: 1,
      async fn() {
        await cache.attentionBuffers(0, qBuffer, {
          numHeads: NUM_HEADS,
          qTokens: PREFILL,
          causal: true,
          out,
        });
        recordGpu(`${name} prefill`, cache.lastGpuTimeMs);
      },
    });
  }
}

globalThis.addEventListener("unload", () => {
  const rows: string[] = [];
  rows.push(`GPU time (timestamp queries, min of runs) on ${adapter.description}:`);
  for (const c of cases) {
    const f32Bytes = 2 * NUM_KV_HEADS * c.context * HEAD_DIM * 4;
    const copyMs = minOf(gpuTimes.get(`copy ${c.context}`));
    // The copy kernel moves f32Bytes each way: its read bandwidth is f32Bytes / copyMs.
    const readGBs = f32Bytes / (copyMs / 1000) / 1e9;
    rows.push(
      `  context ${c.context}: copy kernel ${copyMs.toFixed(2)} ms (${
        readGBs.toFixed(2)
      } GB/s each way)`,
    );
    for (const dtype of ["f32", "f16"] as const) {
      const ms = minOf(gpuTimes.get(`uncompressed ${dtype} ${c.context}`));
      const bytes = f32Bytes / (dtype === "f16" ? 2 : 1);
      const roofline = bytes / (readGBs * 1e9) * 1000;
      rows.push(
        `    uncompressed ${dtype}: ${ms.toFixed(2)} ms GPU; reads ${
          (bytes / 2 ** 20).toFixed(0)
        } MiB, ` +
          `roofline ${roofline.toFixed(2)} ms (${(roofline / ms * 100).toFixed(0)}% of it)`,
      );
    }
    const f32Ms = minOf(gpuTimes.get(`uncompressed f32 ${c.context}`));
    const f16Ms = minOf(gpuTimes.get(`uncompressed f16 ${c.context}`));
    for (const name of TQ_NAMES) {
      const ms = minOf(gpuTimes.get(`turboquant ${name} ${c.context}`));
      const cache = c.tq[name];
      const bits = cache.keyCodec.bitsPerValue + cache.valueCodec.bitsPerValue;
      const bytes = (NUM_KV_HEADS * c.context * HEAD_DIM * bits) / 8;
      const roofline = bytes / (readGBs * 1e9) * 1000;
      rows.push(
        `    turboquant ${name}: ${ms.toFixed(2)} ms GPU, ${
          (f32Ms / ms).toFixed(2)
        }x faster than ` +
          `f32, ${(f16Ms / ms).toFixed(2)}x than f16; reads ${(bytes / 2 ** 20).toFixed(1)} MiB, ` +
          `roofline ${roofline.toFixed(2)} ms (${(roofline / ms * 100).toFixed(1)}% of it)`,
      );
    }
  }
  const f32Prefill = minOf(gpuTimes.get("uncompressed f32 prefill"));
  const tqPrefill = minOf(gpuTimes.get("turboquant K4/V3 prefill"));
  if (!Number.isNaN(f32Prefill)) {
    rows.push(
      `  prefill ${PREFILL} over 4K: uncompressed f32 ${
        f32Prefill.toFixed(1)
      } ms GPU, turboquant ` +
        `K4/V3 ${tqPrefill.toFixed(1)} ms (${(f32Prefill / tqPrefill).toFixed(2)}x)`,
    );
  }
  console.log(rows.join("\n"));
});
