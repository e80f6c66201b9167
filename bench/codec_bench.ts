/**
 * CPU codec throughput at headDim 128, 3 bits (block 32, scale search 9), against converting
 * the same data to f16 (the baseline). Run with `deno task bench` or
 * `deno bench bench/codec_bench.ts`.
 */

import { TurboQuantCodec } from "../mod.ts";

const HEAD_DIM = 128;
const VECTORS = 2048;
const MB = (VECTORS * HEAD_DIM * 4) / 1e6;

function gaussians(n: number, seed: number): Float32Array {
  let s = seed >>> 0;
  const next = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) + 0.5) / 4294967296;
  return Float32Array.from(
    { length: n },
    () => Math.sqrt(-2 * Math.log(next())) * Math.cos(2 * Math.PI * next()),
  );
}

const x = gaussians(VECTORS * HEAD_DIM, 1);
const codec = new TurboQuantCodec({ headDim: HEAD_DIM, bits: 3 });
const noSearch = new TurboQuantCodec({ headDim: HEAD_DIM, bits: 3, scaleSearch: 1 });
const encoded = codec.encode(x);
const f16 = new Float16Array(x.length);
console.log(
  `${VECTORS} vectors x ${HEAD_DIM} (${MB.toFixed(2)} MB f32) at ${codec.bitsPerValue} bits/value`,
);

Deno.bench({
  name: `f16 conversion (${MB.toFixed(1)} MB)`,
  group: "encode",
  baseline: true,
  fn() {
    f16.set(x);
  },
});

Deno.bench({
  name: "TurboQuant encode, 3 bits, scale search 9",
  group: "encode",
  fn() {
    codec.encode(x);
  },
});

Deno.bench({
  name: "TurboQuant encode, 3 bits, scale search off",
  group: "encode",
  fn() {
    noSearch.encode(x);
  },
});

Deno.bench({
  name: "f16 to f32",
  group: "decode",
  baseline: true,
  fn() {
    Float32Array.from(f16);
  },
});

Deno.bench({
  name: "TurboQuant decode, 3 bits",
  group: "decode",
  fn() {
    codec.decode(encoded);
  },
});

const q = x.subarray(0, HEAD_DIM);
Deno.bench({
  name: "TurboQuant dot (no decode), 3 bits",
  group: "decode",
  fn() {
    codec.dot(q, encoded);
  },
});
