import assert from "node:assert/strict";
import { q4_0, q8_0 } from "../bench/_baselines.ts";
import { referenceAttention } from "../examples/encoder/use_lite.ts";
import { attendWithCodec, quantizeKV } from "../examples/demo/attend.ts";
import type { MethodResult } from "../examples/demo/evaluate.ts";
import { modelAvailable } from "../examples/demo/llama_generation.ts";
import {
  compareRankings,
  cosine,
  ErrorAccumulator,
  formatRankingChange,
  headCosines,
  kvBytesPerToken,
  meanPerHead,
  neighbourOrder,
  shiftPerHead,
  smallestNeighbourGap,
  summarize,
} from "../examples/demo/metrics.ts";
import { createProgress } from "../examples/demo/progress.ts";
import {
  absmaxMethod,
  absmaxRoundTrip,
  blockBitsPerValue,
  F16_METHOD,
  F32_METHOD,
  rotatedAbsmaxMethod,
  turboQuantMethod,
} from "../examples/demo/quantizers.ts";
import {
  errorPlotSvg,
  formatCosine,
  formatSci,
  resultRow,
  resultsTable,
} from "../examples/demo/report.ts";
import {
  decadeRange,
  escapeXml,
  formatTick,
  linePlotSvg,
  niceTicks,
} from "../examples/demo/svg_plot.ts";
import { markdownTable, textTable } from "../examples/demo/table.ts";

/** Seeded standard normal values (mulberry32 + Box-Muller). */
function gaussian(n: number, seed: number): Float32Array {
  let a = seed >>> 0;
  const uniform = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (((t ^ (t >>> 14)) >>> 0) + 0.5) / 4294967296;
  };
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    out[i] = Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform());
  }
  return out;
}

/** Checks that every tag is closed in order (a tiny well-formedness check). */
function assertBalancedTags(svg: string): void {
  const stack: string[] = [];
  for (const m of svg.matchAll(/<(\/?)([a-zA-Z]+)[^>]*?(\/?)>/g)) {
    const [, closing, name, selfClosing] = m;
    if (selfClosing) continue;
    if (closing) assert.equal(stack.pop(), name, `unexpected </${name}>`);
    else stack.push(name);
  }
  assert.deepEqual(stack, [], "unclosed tags");
}

function numbersOf(attr: string, svg: string): number[] {
  return [...svg.matchAll(new RegExp(`\\s${attr}="(-?[0-9.]+)"`, "g"))].map((m) => Number(m[1]));
}

Deno.test("svg_plot: tick helpers", () => {
  assert.deepEqual(niceTicks(0, 10), [0, 2, 4, 6, 8, 10]);
  assert.deepEqual(niceTicks(0.1, 0.5, 5), [0.1, 0.2, 0.3, 0.4, 0.5]);
  assert.deepEqual(niceTicks(3, 3), [3]);
  assert.throws(() => niceTicks(2, 1), RangeError);
  assert.deepEqual(decadeRange(3e-5, 0.07), [-5, -1]);
  assert.deepEqual(decadeRange(0.01, 0.01), [-2, -1]);
  assert.deepEqual(decadeRange(1, 1000), [0, 3]);
  assert.throws(() => decadeRange(0, 1), RangeError);
  assert.equal(formatTick(4), "4");
  assert.equal(formatTick(0.30000000000000004), "0.3");
  assert.equal(escapeXml(`a<b & "c" 'd'>`), "a&lt;b &amp; &quot;c&quot; &apos;d&apos;&gt;");
});

Deno.test("svg_plot: a log plot has a polyline per series, the legend and decade labels", () => {
  const svg = linePlotSvg({
    title: "Error <vs> bits",
    subtitle: "sub & title",
    xLabel: "bits per value",
    yLabel: "1 - cosine",
    series: [
      { name: "A", points: [[4, 1e-3], [2, 1e-1], [3, 1e-2]] },
      { name: "B & C", points: [[2, 2e-1], [3, 0], [4, 3e-3]], dash: "4 2" },
    ],
    references: [{ name: "f16", y: 1e-5 }],
    logY: true,
    xTicks: [2, 3, 4],
  });
  assert.match(svg, /^<\?xml version="1.0"/);
  assertBalancedTags(svg);
  assert.ok(svg.includes("Error &lt;vs&gt; bits") && svg.includes("sub &amp; title"));
  assert.ok(svg.includes(">B &amp; C</text>") && svg.includes(">A</text>"));
  assert.ok(svg.includes(">f16</text>"));
  const polylines = [...svg.matchAll(/<polyline points="([^"]*)"/g)].map((m) => m[1].split(" "));
  assert.equal(polylines.length, 2);
  assert.equal(polylines[0].length, 3);
  assert.equal(polylines[1].length, 2, "y = 0 is skipped on a log axis");
  // Points are drawn in x order, and a smaller error is lower on the page (larger y).
  const a = polylines[0].map((p) => p.split(",").map(Number));
  assert.ok(a[0][0] < a[1][0] && a[1][0] < a[2][0]);
  assert.ok(a[0][1] < a[1][1] && a[1][1] < a[2][1]);
  // Decades 10^-5 .. 10^0 are labelled (10 with a raised exponent).
  for (const e of [-5, -4, -3, -2, -1, 0]) {
    assert.ok(svg.includes(`font-size="11">${e}</tspan>`), `decade ${e}`);
  }
  // Everything lies inside the canvas.
  const [w, h] = [760, 500];
  for (const x of [...numbersOf("x", svg), ...numbersOf("cx", svg), ...numbersOf("x1", svg)]) {
    assert.ok(x >= 0 && x <= w, `x ${x}`);
  }
  for (const y of [...numbersOf("y", svg), ...numbersOf("cy", svg), ...numbersOf("y1", svg)]) {
    assert.ok(y >= 0 && y <= h, `y ${y}`);
  }
});

Deno.test("svg_plot: linear axes, default ticks, and an empty plot is refused", () => {
  const svg = linePlotSvg({
    title: "t",
    xLabel: "x",
    yLabel: "y",
    series: [{ name: "s", points: [[0, 0], [1, 5], [2, 10]], color: "#123456" }],
  });
  assertBalancedTags(svg);
  assert.ok(svg.includes(`stroke="#123456"`));
  for (const t of ["0", "2", "4", "6", "8", "10"]) assert.ok(svg.includes(`>${t}</text>`));
  assert.throws(
    () =>
      linePlotSvg({ title: "t", xLabel: "x", yLabel: "y", series: [{ name: "e", points: [] }] }),
    RangeError,
  );
});

Deno.test("table: text and markdown", () => {
  const t = { headers: ["name", "value"], rows: [["a", "1"], ["bbb", "22.5"]] };
  assert.equal(textTable(t), "name  value\n----  -----\na         1\nbbb    22.5");
  assert.equal(
    markdownTable(t),
    "| name | value |\n| --- | ---: |\n| a | 1 |\n| bbb | 22.5 |",
  );
  assert.equal(
    markdownTable({ headers: ["x"], rows: [["a|b"]], align: ["right"] }),
    "| x |\n| ---: |\n| a\\|b |",
  );
  assert.throws(() => textTable({ headers: ["a", "b"], rows: [["1"]] }), RangeError);
});

Deno.test("progress: stamped lines through the given writer", () => {
  const lines: string[] = [];
  const p = createProgress((l) => lines.push(l));
  p.log("loading");
  assert.match(lines[0], /^\[\s+\d+\.\ds\] loading$/);
  assert.ok(p.elapsed() >= 0);
});

Deno.test("metrics: pooled NMSE, cosines and summaries", () => {
  const acc = new ErrorAccumulator();
  assert.equal(acc.value, 0);
  acc.add([1, 0], [1, 1]); // err 1, ref 1
  acc.add([0, 3], [0, 1]); // err 4, ref 9
  assert.equal(acc.value, 5 / 10);
  assert.throws(() => acc.add([1], [1, 2]), RangeError);
  assert.equal(cosine([1, 0], [0, 1]), 0);
  assert.ok(Math.abs(cosine([1, 2], [2, 4]) - 1) < 1e-15);
  assert.equal(cosine([0, 0], [1, 1]), 0);
  const a = new Float32Array([1, 0, 0, 1]);
  const b = new Float32Array([1, 0, 0, -1]);
  assert.deepEqual(headCosines(a, b, 2), [1, -1]);
  assert.throws(() => headCosines(a, b, 3), RangeError);
  assert.deepEqual(summarize([1, 0.5, 0.75]), { mean: 0.75, min: 0.5 });
  assert.throws(() => summarize([]), RangeError);
  assert.equal(kvBytesPerToken(3.5, 4, 128), 448);
  assert.equal(kvBytesPerToken(16, 4, 64), 1024);
});

Deno.test("metrics: neighbour rankings and their changes", () => {
  const exact = [[1, 0, 0], [0.9, 0.1, 0], [0.5, 0.5, 0], [0, 0, 1]];
  assert.deepEqual(neighbourOrder(exact, 0), [1, 2, 3]);
  const same = compareRankings(exact, exact);
  assert.deepEqual(same, { unchanged: 4, total: 4, maxDisplacement: 0, nearestKept: 4 });
  assert.equal(formatRankingChange(same), "4/4 rankings unchanged");
  // Moving vector 2 next to vector 0 swaps 0's two nearest neighbours.
  const moved = [[1, 0, 0], [0.9, 0.1, 0], [1, 0.01, 0], [0, 0, 1]];
  const r = compareRankings(exact, moved);
  assert.ok(r.unchanged < 4);
  assert.equal(r.maxDisplacement, 1);
  assert.match(
    formatRankingChange(r),
    /^\d\/4 rankings unchanged, max shift 1, nearest kept \d\/4$/,
  );
  // Neighbour cosines: 0 -> (0.8, 0), 1 -> (0.8, 0.6), 2 -> (0.6, 0): smallest gap 0.2.
  const gap = smallestNeighbourGap([[1, 0], [0.8, 0.6], [0, 1]]);
  assert.ok(Math.abs(gap - 0.2) < 1e-12, `gap ${gap}`);
});

Deno.test("metrics: per-head mean and shift", () => {
  // 2 heads, 2 tokens, headDim 2.
  const x = new Float32Array([1, 2, 3, 4, 10, 20, 30, 40]);
  const mu = meanPerHead(x, 2, 2);
  assert.deepEqual([...mu], [2, 3, 20, 30]);
  const c = shiftPerHead(x, mu, 2, -1);
  assert.deepEqual([...c], [-1, -1, 1, 1, -10, -10, 10, 10]);
  assert.deepEqual([...shiftPerHead(c, mu, 2, 1)], [...x]);
  assert.throws(() => meanPerHead(new Float32Array(3), 2, 2), RangeError);
});

Deno.test("quantizers: absmax family matches llama.cpp q4_0 and q8_0, storage costs", () => {
  const x = gaussian(64 * 20, 7).map((v, i) => v * (1 + (i % 64) / 8));
  assert.deepEqual(absmaxRoundTrip(4)(x, 64), q4_0(x, 64));
  assert.deepEqual(absmaxMethod(4).roundTrip(x, 64), q4_0(x, 64));
  assert.deepEqual(absmaxMethod(8).roundTrip(x, 64), q8_0(x, 64));
  assert.equal(absmaxMethod(5).bitsPerValue, 5.5);
  assert.equal(rotatedAbsmaxMethod(4).bitsPerValue, 4.5);
  assert.equal(blockBitsPerValue(3), 3.5);
  assert.throws(() => absmaxRoundTrip(1), RangeError);
  // More bits, less error.
  const err = [2, 3, 4, 5, 6].map((b) => {
    const acc = new ErrorAccumulator();
    acc.add(x, absmaxRoundTrip(b)(x, 64));
    return acc.value;
  });
  for (let i = 1; i < err.length; i++) assert.ok(err[i] < err[i - 1], `bits ${i + 2}`);
  // TurboQuant's storage with blocks of 32: 4 bits = q4_0's 4.5 bits per value.
  assert.equal(turboQuantMethod(4).bitsPerValue, 4.5);
  assert.equal(turboQuantMethod(3).bitsPerValue, 3.5);
  assert.deepEqual(turboQuantMethod(8).codec, { bits: 8, blockSize: 32 });
  assert.deepEqual(F16_METHOD.roundTrip(new Float32Array([1 / 3]), 1)[0], Math.f16round(1 / 3));
  assert.deepEqual(F32_METHOD.roundTrip(x, 64), x);
});

Deno.test("attend: centring helps offset keys, floats are exact, attention is the reference", async () => {
  const info = { layer: 0, numHeads: 2, headDim: 64, tokens: 16, scale: 1 / 8 };
  const n = info.numHeads * info.tokens * info.headDim;
  const q = gaussian(n, 1);
  const v = gaussian(n, 2);
  // Keys with a large shared component per head, like the encoder's.
  const offset = gaussian(info.numHeads * info.headDim, 3).map((o) => 6 * o);
  const k = shiftPerHead(gaussian(n, 4), offset, info.numHeads, 1);
  const tq = turboQuantMethod(3);
  const errOf = (centre: boolean) => {
    const acc = new ErrorAccumulator();
    acc.add(k, quantizeKV(tq, info, k, v, centre).k);
    return acc.value;
  };
  assert.ok(errOf(true) < 0.5 * errOf(false), `${errOf(true)} vs ${errOf(false)}`);
  const exact = quantizeKV(F32_METHOD, info, k, v, true);
  assert.deepEqual(exact.k, k);
  assert.deepEqual(exact.v, v);
  const out = await attendWithCodec(F32_METHOD, true)(info, q, k, v);
  assert.deepEqual(out, referenceAttention(info, q, k, v).output);
  const approx = await attendWithCodec(tq, true)(info, q, k, v);
  for (const c of headCosines(out, approx, 2)) assert.ok(c > 0.95 && c < 1, `cos ${c}`);
});

Deno.test("report: formatting, table rows and the plot", () => {
  assert.equal(formatCosine(1), "1");
  assert.equal(formatCosine(0.99951), "0.99951");
  assert.equal(formatCosine(0.9), "0.9000");
  assert.equal(formatCosine(0.999999947), "0.999999947");
  assert.equal(formatSci(0), "0");
  assert.equal(formatSci(0.0012345), "1.23e-3");
  const result = (method: MethodResult["method"], error: number): MethodResult => ({
    method,
    keyNmse: 0.0156,
    valueNmse: 0.0257,
    attentionCosine: [{ mean: 0.98, min: 0.97 }, { mean: 0.99, min: 0.985 }],
    attentionError: error,
    embeddingCosine: { mean: 0.99, min: 0.985 },
    ranking: { unchanged: 6, total: 6, maxDisplacement: 0, nearestKept: 6 },
  });
  const shape = { numHeads: 4, headDims: [64, 128] };
  const tq3 = result(turboQuantMethod(3), 0.016);
  assert.deepEqual(resultRow(tq3, shape), [
    "TurboQuant 3-bit",
    "3.5",
    "224 / 448",
    "4.57x",
    "9.14x",
    "1.56e-2",
    "2.57e-2",
    "0.9800 / 0.9700",
    "0.9900 / 0.9850",
    "0.9900 / 0.9850",
    "6/6 rankings unchanged",
  ]);
  assert.equal(resultsTable([tq3], shape).rows.length, 1);
  const svg = errorPlotSvg(
    [
      tq3,
      result(turboQuantMethod(4), 0.0036),
      result(absmaxMethod(4), 0.0052),
      result(rotatedAbsmaxMethod(4), 0.0053),
      result(F16_METHOD, 4e-8),
    ],
    "subtitle",
  );
  assertBalancedTags(svg);
  assert.equal([...svg.matchAll(/<polyline /g)].length, 3);
  assert.ok(svg.includes("f16 (16 bits/value)"));
});

Deno.test("llama_generation: a missing model file is reported as absent", async () => {
  assert.equal(await modelAvailable(new URL("file:///nonexistent/stories260k.bin")), false);
});
