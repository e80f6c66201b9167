/**
 * Prints, for the demo paragraphs and each layer of the real encoder: tokens, head dim, per-token
 * K and V norms (min / mean / max over heads and tokens) and the per-channel mean of K, which
 * shows why key centring matters: a large part of every key is one shared vector per head.
 *
 *     deno run -A examples/encoder/probe.ts
 *
 * Columns of the centring table, per layer and head, over all paragraphs' keys:
 * - `|mu|/rms|k|`: norm of the mean key over the root-mean-square key norm;
 * - `mu share`: fraction of the keys' energy in the mean (|mu|^2 / mean |k|^2);
 * - `top channels`: the channels with the largest |mean|, as channel:mean (channel std).
 *
 * @module
 */

import { type Capture, HEAD_DIMS, loadEncoder, NUM_HEADS, NUM_LAYERS } from "./use_lite.ts";
import { PARAGRAPHS } from "./texts.ts";

function rowNorms(x: Float32Array, d: number): number[] {
  const out: number[] = [];
  for (let r = 0; r < x.length / d; r++) {
    let s = 0;
    for (let i = 0; i < d; i++) s += x[r * d + i] ** 2;
    out.push(Math.sqrt(s));
  }
  return out;
}

function stats(xs: number[]): string {
  const mean = xs.reduce((a, b) => a + b, 0) / xs.length;
  return `${Math.min(...xs).toFixed(2)} / ${mean.toFixed(2)} / ${Math.max(...xs).toFixed(2)}`;
}

const enc = await loadEncoder();
const captures: Capture[] = [];
console.log("Per paragraph: K and V per-token norms, min / mean / max over heads and tokens\n");
console.log(
  "year  president             layer tokens headDim  |k| min/mean/max      |v| min/mean/max",
);
for (const p of PARAGRAPHS) {
  const c = await enc.capture(p.text);
  captures.push(c);
  for (const L of c.layers) {
    console.log(
      `${p.year}  ${p.president.padEnd(20)}  ${L.layer}     ${String(L.tokens).padStart(4)}  ` +
        `${String(L.headDim).padStart(6)}   ${stats(rowNorms(L.k, L.headDim)).padEnd(20)}  ` +
        stats(rowNorms(L.v, L.headDim)),
    );
  }
}

console.log("\nKey centring, per layer and head, over all paragraphs' keys\n");
for (let l = 0; l < NUM_LAYERS; l++) {
  const D = HEAD_DIMS[l];
  for (let h = 0; h < NUM_HEADS; h++) {
    const sum = new Float64Array(D);
    const sq = new Float64Array(D);
    let n = 0;
    let energy = 0;
    for (const c of captures) {
      const L = c.layers[l];
      for (let t = 0; t < L.tokens; t++) {
        const o = (h * L.tokens + t) * D;
        for (let i = 0; i < D; i++) {
          const x = L.k[o + i];
          sum[i] += x;
          sq[i] += x * x;
          energy += x * x;
        }
        n++;
      }
    }
    const mu = Array.from(sum, (s) => s / n);
    const sd = mu.map((m, i) => Math.sqrt(Math.max(0, sq[i] / n - m * m)));
    const muSq = mu.reduce((a, m) => a + m * m, 0);
    const meanSq = energy / n;
    const top = mu.map((m, i) => ({ i, m })).sort((a, b) => Math.abs(b.m) - Math.abs(a.m))
      .slice(0, 4).map(({ i, m }) => `${i}:${m.toFixed(2)} (${sd[i].toFixed(2)})`).join("  ");
    console.log(
      `layer ${l} head ${h}  |mu|/rms|k| ${(Math.sqrt(muSq / meanSq)).toFixed(3)}  ` +
        `mu share ${(muSq / meanSq).toFixed(3)}  top channels ${top}`,
    );
  }
}

console.log("\nPer-channel mean of K (layer, head: all channels, over all paragraphs)\n");
for (let l = 0; l < NUM_LAYERS; l++) {
  const D = HEAD_DIMS[l];
  for (let h = 0; h < NUM_HEADS; h++) {
    const sum = new Float64Array(D);
    let n = 0;
    for (const c of captures) {
      const L = c.layers[l];
      for (let t = 0; t < L.tokens; t++) {
        const o = (h * L.tokens + t) * D;
        for (let i = 0; i < D; i++) sum[i] += L.k[o + i];
        n++;
      }
    }
    console.log(`layer ${l} head ${h}: ${Array.from(sum, (s) => (s / n).toFixed(2)).join(" ")}`);
  }
}
enc.dispose();
