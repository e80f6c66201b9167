/**
 * Append throughput of the TurboQuant cache (GPU quantization: rotation, scale search,
 * packing) for prefill chunks of 512 tokens and single-token decode appends, headDim 128,
 * 8 KV heads, keys 4 / values 3 bits; baseline: writing the same K/V uncompressed (f32
 * writeBuffer). Each iteration waits for the GPU. `deno bench -A bench/cache_bench.ts`.
 */

import { describeAdapter, requestTurboQuantDevice, TurboQuantKVCache } from "../mod.ts";

const HEADS = 8;
const HEAD_DIM = 128;
const CAPACITY = 8192;

const device = await requestTurboQuantDevice();
console.log(`adapter: ${describeAdapter(device).description}`);

const cache = new TurboQuantKVCache(device, {
  numLayers: 1,
  numKvHeads: HEADS,
  headDim: HEAD_DIM,
  initialCapacity: CAPACITY,
});
const raw = device.createBuffer({
  label: "turboquant/bench-raw-kv",
  size: CAPACITY * HEADS * HEAD_DIM * 4 * 2,
  usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST,
});
const f32BytesPerToken = 2 * HEADS * HEAD_DIM * 4;
const tqBytesPerToken =
  (HEADS * HEAD_DIM * (cache.keyCodec.bitsPerValue + cache.valueCodec.bitsPerValue)) / 8;
console.log(
  `bytes per token: f32 ${f32BytesPerToken}, f16 ${f32BytesPerToken / 2}, TurboQuant K4/V3 ` +
    `${tqBytesPerToken} (${(f32BytesPerToken / 2 / tqBytesPerToken).toFixed(2)}x smaller than f16)`,
);

function data(tokens: number): Float32Array<ArrayBuffer> {
  return Float32Array.from({ length: HEADS * tokens * HEAD_DIM }, (_, i) => Math.sin(i * 0.37) * 2);
}

let rawLength = 0;
async function rawAppend(x: Float32Array<ArrayBuffer>, tokens: number): Promise<void> {
  if (rawLength + tokens > CAPACITY) rawLength = 0;
  device.queue.writeBuffer(raw, rawLength * f32BytesPerToken, x);
  device.queue.writeBuffer(raw, rawLength * f32BytesPerToken + x.byteLength, x);
  rawLength += tokens;
  await device.queue.onSubmittedWorkDone();
}

async function tqAppend(x: Float32Array, tokens: number): Promise<void> {
  if (cache.seqLen(0) + tokens > CAPACITY) await cache.truncate(0);
  await cache.append(0, x, x);
  await device.queue.onSubmittedWorkDone();
}

for (const tokens of [512, 1]) {
  const x = data(tokens);
  const group = tokens === 1 ? "decode append (1 token)" : `prefill append (${tokens} tokens)`;
  await tqAppend(x, tokens); // compile outside the timing
  Deno.bench({
    name: `f32 writeBuffer, ${tokens} tokens`,
    group,
    baseline: true,
    async fn() {
      await rawAppend(x, tokens);
    },
  });
  Deno.bench({
    name: `TurboQuant append K4/V3, ${tokens} tokens`,
    group,
    async fn(b) {
      b.start();
      await tqAppend(x, tokens);
      b.end();
    },
  });
}

globalThis.addEventListener("unload", () => {
  cache.destroy();
  raw.destroy();
});
