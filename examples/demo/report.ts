/**
 * Turns measured {@linkcode MethodResult}s into the demo's tables and its error-vs-bits plot.
 *
 * @module
 */

import type { MethodResult } from "./evaluate.ts";
import { formatRankingChange, kvBytesPerToken, type Summary } from "./metrics.ts";
import type { Family } from "./quantizers.ts";
import { linePlotSvg, type PlotSeries } from "./svg_plot.ts";
import type { Table } from "./table.ts";

/** Heads and per-layer head dims of the model, for the storage columns. */
export interface ModelShape {
  /** KV heads per layer. */
  numHeads: number;
  /** Head dim of each layer. */
  headDims: readonly number[];
}

/**
 * A cosine with enough decimals to show how far below 1 it is: two significant digits of
 * 1 - c, at least 4 decimals, at most 9 ("1" when exactly 1).
 */
export function formatCosine(c: number): string {
  if (c >= 1) return "1";
  const digits = Math.min(9, Math.max(4, Math.ceil(-Math.log10(1 - c)) + 1));
  return c.toFixed(digits);
}

/** Scientific notation with 3 significant digits ("0" for 0). */
export function formatSci(x: number): string {
  return x === 0 ? "0" : x.toExponential(2);
}

/** "mean / min" of a cosine summary. */
export function formatCosineSummary(s: Summary | undefined): string {
  return s ? `${formatCosine(s.mean)} / ${formatCosine(s.min)}` : "-";
}

/** Header of {@linkcode resultsTable}. */
export const RESULT_HEADERS: readonly string[] = [
  "format",
  "bits/value",
  "bytes/token L0 / L1",
  "vs f16",
  "vs f32",
  "K NMSE",
  "V NMSE",
  "attn cos L0 mean / min",
  "attn cos L1 mean / min",
  "embedding cos mean / min",
  "NN rankings",
];

/** One row of {@linkcode resultsTable}. */
export function resultRow(r: MethodResult, shape: ModelShape): string[] {
  const bpv = r.method.bitsPerValue;
  const bytes = shape.headDims.map((d) => formatTick(kvBytesPerToken(bpv, shape.numHeads, d)));
  return [
    r.method.name,
    formatTick(bpv),
    bytes.join(" / "),
    `${(16 / bpv).toFixed(2)}x`,
    `${(32 / bpv).toFixed(2)}x`,
    formatSci(r.keyNmse),
    formatSci(r.valueNmse),
    ...r.attentionCosine.map(formatCosineSummary),
    formatCosineSummary(r.embeddingCosine),
    r.ranking ? formatRankingChange(r.ranking) : "-",
  ];
}

function formatTick(v: number): string {
  return Number.isInteger(v) ? String(v) : String(Number(v.toFixed(3)));
}

/** A table of results, one row each, in the given order. */
export function resultsTable(results: readonly MethodResult[], shape: ModelShape): Table {
  return { headers: RESULT_HEADERS, rows: results.map((r) => resultRow(r, shape)) };
}

/** Legend label and style of each plotted family. */
const FAMILY_STYLE: Record<Exclude<Family, "float">, Omit<PlotSeries, "points">> = {
  "turboquant": { name: "TurboQuant (Lloyd-Max codes, searched f16 scale / 32 values)" },
  "absmax": { name: "absmax q{b}_0 (llama.cpp q4_0 style; q8_0 at 8.5)", dash: "7 4" },
  "rotated-absmax": { name: "Hadamard-rotated absmax (rot-q{b}_0)", dash: "2 3" },
};

/** The error-vs-bits plot: 1 - mean attention-output cosine per family, log y, and f16. */
export function errorPlotSvg(results: readonly MethodResult[], subtitle: string): string {
  const series: PlotSeries[] = [];
  for (const [family, style] of Object.entries(FAMILY_STYLE)) {
    const points = results.filter((r) => r.method.family === family)
      .map((r) => [r.method.bitsPerValue, r.attentionError] as const);
    if (points.length > 0) series.push({ ...style, points });
  }
  const f16 = results.find((r) => r.method.name === "f16");
  return linePlotSvg({
    title: "Attention-output error vs. storage, real Universal Sentence Encoder K/V",
    subtitle,
    xLabel: "stored bits per value (codes + f16 block scales)",
    yLabel: "attention-output error: 1 - cosine (log scale)",
    series,
    references: f16 && f16.attentionError > 0
      ? [{ name: "f16 (16 bits/value)", y: f16.attentionError }]
      : [],
    logY: true,
    xTicks: [2, 3, 4, 5, 6, 7, 8, 9],
    width: 820,
    height: 620,
  });
}
