/**
 * TurboQuant on a real model's KV cache, end to end, in under a minute on a laptop CPU.
 *
 *     deno task demo [--out demo_error_vs_bits.svg] [--no-centring] [--steps 60]
 *
 * 1. Runs Google's pretrained Universal Sentence Encoder lite (2 layers, 4 heads, head_dim 64
 *    and 128) on six State of the Union excerpts and takes each layer's real K and V.
 * 2. Stores K and V with TurboQuant at 2-8 bits, with llama.cpp-style q{b}_0 and with its
 *    Hadamard-rotated form (keys centred on the paragraph's mean key for every format), and
 *    measures: K/V error, each layer's attention output against the model's own, and the final
 *    sentence embeddings with the stored K/V in every layer (layer 1 sees the perturbed
 *    layer 0) and their nearest-neighbour rankings.
 * 3. Prints the tables (text and markdown), writes an SVG plot of attention error against
 *    bits per value, and, when `../shared/models/stories260k.bin` exists, compares greedy
 *    generations of a small llama2.c model with exact and TurboQuant K/V.
 *
 * Progress goes to stderr, results to stdout. The attention step is `attendWithCodec` in
 * `examples/demo/attend.ts`: TurboQuant at 2, 3 and 4 bits runs in the library's GPU cache and
 * fused kernel (when a WebGPU adapter exists), everything else on the CPU.
 *
 * @module
 */

import { resolve } from "node:path";
import { parseArgs } from "node:util";
import { HEAD_DIMS, loadEncoder, NUM_HEADS } from "./encoder/use_lite.ts";
import { PARAGRAPHS } from "./encoder/texts.ts";
import {
  crossCheckRoutes,
  evaluateMethod,
  keyMeanShare,
  type MethodResult,
  type ParagraphRun,
} from "./demo/evaluate.ts";
import { compareGenerations, MODEL_URL, modelAvailable } from "./demo/llama_generation.ts";
import { createProgress, type Progress } from "./demo/progress.ts";
import { GPU_BITS } from "./demo/attend.ts";
import { describeAdapter, requestTurboQuantDevice } from "../mod.ts";
import {
  absmaxMethod,
  F16_METHOD,
  F32_METHOD,
  type KVMethod,
  rotatedAbsmaxMethod,
  turboQuantMethod,
} from "./demo/quantizers.ts";
import {
  errorPlotSvg,
  formatCosine,
  formatSci,
  type ModelShape,
  resultsTable,
} from "./demo/report.ts";
import { markdownTable, textTable } from "./demo/table.ts";
import { cosine, smallestNeighbourGap } from "./demo/metrics.ts";

const SHAPE: ModelShape = { numHeads: NUM_HEADS, headDims: HEAD_DIMS };

/** Default plot file, in the directory the demo is started from. */
const DEFAULT_OUT = "demo_error_vs_bits.svg";

/** Bit widths of the plotted lines; the tables use a subset. */
const PLOT_BITS = [2, 3, 4, 5, 6, 8];

interface Args {
  out: string;
  centreKeys: boolean;
  steps: number;
}

function parse(argv: string[]): Args | null {
  const { values } = parseArgs({
    args: argv,
    options: {
      out: { type: "string", default: DEFAULT_OUT },
      "no-centring": { type: "boolean", default: false },
      steps: { type: "string", default: "60" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    console.log(
      `usage: deno task demo [--out ${DEFAULT_OUT}] [--no-centring] [--steps 60]\n` +
        "  --out: where the SVG plot goes (relative to the current directory)\n" +
        "  --no-centring: quantize raw keys instead of keys minus their mean\n" +
        "  --steps: new tokens of the llama2.c generation",
    );
    return null;
  }
  const steps = Number(values.steps);
  if (!Number.isInteger(steps) || steps < 1) throw new Error(`--steps: ${values.steps}`);
  // `deno task` runs in the repo root; resolve --out against the caller's directory.
  const out = resolve(Deno.env.get("INIT_CWD") ?? Deno.cwd(), values.out);
  return { out, centreKeys: !values["no-centring"], steps };
}

/** Runs the encoder once per paragraph and keeps the exact Q/K/V/outputs/embedding. */
async function captureParagraphs(progress: Progress): Promise<{
  encoder: Awaited<ReturnType<typeof loadEncoder>>;
  runs: ParagraphRun[];
}> {
  progress.log("loading the Universal Sentence Encoder lite (npm:@energetic-ai/...)");
  const encoder = await loadEncoder();
  progress.log(`model loaded (TF.js backend ${encoder.backend})`);
  const runs: ParagraphRun[] = [];
  for (const [i, p] of PARAGRAPHS.entries()) {
    const capture = await encoder.capture(p.text);
    runs.push({ text: p.text, capture });
    progress.log(
      `paragraph ${i + 1}/${PARAGRAPHS.length}: ${p.year} ${p.president}, ${capture.tokens} tokens`,
    );
  }
  return { encoder, runs };
}

/** Every method measured, in evaluation order; `embeddings` marks the table rows. */
function methods(): { method: KVMethod; embeddings: boolean }[] {
  const table = new Set([2, 3, 4, 8]);
  const out: { method: KVMethod; embeddings: boolean }[] = [
    { method: F32_METHOD, embeddings: true },
    { method: F16_METHOD, embeddings: true },
  ];
  for (const b of PLOT_BITS) out.push({ method: turboQuantMethod(b), embeddings: table.has(b) });
  for (const b of PLOT_BITS) {
    const baseline = b === 4 || b === 8;
    out.push({ method: absmaxMethod(b), embeddings: baseline });
    out.push({ method: rotatedAbsmaxMethod(b), embeddings: baseline });
  }
  return out;
}

function pick(results: readonly MethodResult[], names: readonly string[]): MethodResult[] {
  return names.map((n) => {
    const r = results.find((x) => x.method.name === n);
    if (!r) throw new Error(`no result for ${n}`);
    return r;
  });
}

/** "TurboQuant 4-bit vs rot-q4_0 at 4.5 bits/value: attention error 1.2e-3 vs 1.5e-3 (20% lower)". */
function compareLine(a: MethodResult, b: MethodResult): string {
  const change = a.attentionError / b.attentionError - 1;
  const word = change <= 0 ? "lower" : "higher";
  return `${a.method.name} vs ${b.method.name} at ${a.method.bitsPerValue} bits/value: ` +
    `attention error (1 - cos) ${formatSci(a.attentionError)} vs ${formatSci(b.attentionError)}` +
    ` (${Math.abs(change * 100).toFixed(0)}% ${word})`;
}

function printTables(results: readonly MethodResult[], centreKeys: boolean, share: number[]) {
  const main = pick(results, [
    "f32",
    "f16",
    "TurboQuant 4-bit",
    "TurboQuant 3-bit",
    "TurboQuant 2-bit",
  ]);
  console.log("\n## TurboQuant at 2, 3 and 4 bits against f16 and f32\n");
  console.log(textTable(resultsTable(main, SHAPE)));
  console.log("\n## Equal budgets: llama.cpp-style baselines and TurboQuant at the same bits\n");
  const eq = pick(results, [
    "q4_0",
    "rot-q4_0",
    "TurboQuant 4-bit",
    "q8_0",
    "rot-q8_0",
    "TurboQuant 8-bit",
  ]);
  console.log(textTable(resultsTable(eq, SHAPE)));
  const [q4, rq4, tq4, q8, rq8, tq8] = eq;
  console.log();
  for (const [a, b] of [[tq4, q4], [tq4, rq4], [tq8, q8], [tq8, rq8]]) {
    console.log(compareLine(a, b));
  }
  console.log(
    `\nColumns: bytes/token = K + V of all ${NUM_HEADS} heads of one layer (L0 head_dim ` +
      `${HEAD_DIMS[0]}, L1 head_dim ${HEAD_DIMS[1]}); NMSE = sum ||x - x~||^2 / sum ||x||^2 ` +
      `over both layers, all paragraphs, heads and tokens; attention cosines per head and ` +
      `paragraph against the model's own output (exact Q, K, V of that layer); embedding: the ` +
      `512-d sentence embedding with the format in both layers (layer 1 sees the perturbed ` +
      `layer 0); NN rankings: each paragraph's order of the other five by embedding cosine.`,
  );
  console.log(
    centreKeys
      ? `Keys are centred for every format (the per-head per-channel mean key of the paragraph ` +
        `is subtracted before encoding and added back after; softmax ignores the shift, so it ` +
        `is not counted in the storage). K NMSE is over the raw keys; the mean holds ` +
        `${share.map((s) => `${(s * 100).toFixed(0)}%`).join(" / ")} (L0 / L1) of their ` +
        `energy, so relative to the centred keys the codec sees, K NMSE is ` +
        `${share.map((s) => `${(1 / (1 - s)).toFixed(1)}x`).join(" / ")} higher.`
      : "Keys are not centred (--no-centring).",
  );
}

function printPlotData(results: readonly MethodResult[]): void {
  const families = ["turboquant", "absmax", "rotated-absmax"] as const;
  const rows = PLOT_BITS.map((b) => [
    String(b),
    ...families.map((f) => {
      const r = results.find((x) => x.method.family === f && x.method.bits === b)!;
      return `${formatSci(r.attentionError)} (${r.method.bitsPerValue})`;
    }),
  ]);
  console.log("\n## Plotted: attention-output error 1 - mean cosine (bits/value)\n");
  console.log(textTable({
    headers: ["bits", "TurboQuant", "absmax q{b}_0", "rotated absmax"],
    rows,
  }));
}

async function printGeneration(
  progress: Progress,
  steps: number,
  device: GPUDevice | null,
): Promise<void> {
  console.log("\n## Generation with a small pretrained llama2.c model\n");
  if (!(await modelAvailable())) {
    console.log(
      `No model at ${MODEL_URL.pathname}. Put llama2.c's stories260K there (the v1 export ` +
        `stories260k.bin, or the legacy stories260K.bin with its tokenizer.bin; see ` +
        `https://huggingface.co/karpathy/tinyllamas) to see a greedy generation with exact ` +
        `and TurboQuant K/V.`,
    );
    return;
  }
  progress.log("generating with stories260k (exact, then TurboQuant K8/V4)");
  const g = await compareGenerations(
    {
      prompt: "Once upon a time",
      steps,
      keyBits: 8,
      valueBits: 4,
    },
    undefined,
    device,
  );
  console.log(
    `stories260k: head_dim 8, keys 8 bits (${g.bitsPerValue.key} bits/value with the f16 ` +
      `scale of each 8-value block), values 4 bits (${g.bitsPerValue.value}), keys centred ` +
      `on the prompt's mean key; greedy, ${steps} new tokens at most.\n`,
  );
  for (const r of g.runs) {
    console.log(`[${r.label}, ${r.tokensPerSecond.toFixed(0)} tokens/s]\n${r.text.trim()}\n`);
  }
  console.log(
    g.firstDifference === null
      ? "The two continuations are identical."
      : `The continuations agree for ${g.firstDifference} new tokens, then differ.`,
  );
}

/** The GPU device for the TurboQuant cache, or null (with a note) where WebGPU is missing. */
async function gpuDevice(progress: Progress): Promise<GPUDevice | null> {
  try {
    const device = await requestTurboQuantDevice();
    progress.log(
      `GPU: ${describeAdapter(device).description}; TurboQuant ${GPU_BITS.join("/")}-bit ` +
        `attention runs in the GPU cache's fused kernel`,
    );
    return device;
  } catch (e) {
    progress.log(`no WebGPU adapter (${(e as Error).message}): every format runs on the CPU`);
    return null;
  }
}

async function main(argv: string[]): Promise<void> {
  const args = parse(argv);
  if (!args) return;
  const progress = createProgress(undefined, 0); // times from process start
  const device = await gpuDevice(progress);
  const { encoder, runs } = await captureParagraphs(progress);
  const results: MethodResult[] = [];
  for (const { method, embeddings } of methods()) {
    progress.log(
      `${method.name} (${method.bitsPerValue} bits/value)` + (embeddings ? " + embeddings" : ""),
    );
    results.push(
      await evaluateMethod(encoder, method, runs, {
        centreKeys: args.centreKeys,
        embeddings,
        device,
      }),
    );
  }
  progress.log("cross-check: model's own attention over round-tripped K/V vs attendWithCodec");
  const check = await crossCheckRoutes(
    encoder,
    turboQuantMethod(3),
    runs,
    args.centreKeys,
    device,
  );

  const tokens = runs.map((r) => r.capture.tokens);
  console.log(
    `# TurboQuant on the Universal Sentence Encoder lite's real K/V\n\n` +
      `${runs.length} State of the Union excerpts (${Math.min(...tokens)}-${Math.max(...tokens)} ` +
      `tokens), 2 layers x ${NUM_HEADS} heads, head_dim ${HEAD_DIMS.join(" / ")}.`,
  );
  printTables(results, args.centreKeys, keyMeanShare(runs));
  const exact = runs.map((r) => r.capture.embedding);
  const cosines = exact.flatMap((e, i) => exact.slice(i + 1).map((f) => cosine(e, f)));
  console.log(
    `Pairwise cosines of the exact embeddings: ${Math.min(...cosines).toFixed(3)}-` +
      `${Math.max(...cosines).toFixed(3)}; smallest gap between successive neighbours in a ` +
      `ranking: ${formatSci(smallestNeighbourGap(exact))} (embedding errors of that size can ` +
      `swap two neighbours).`,
  );
  console.log(
    `Cross-check (TurboQuant 3-bit): embeddings from the model's own attention over the ` +
      `round-tripped K/V and from attendWithCodec agree to cosine ${formatCosine(check.min)} ` +
      `(min over paragraphs).`,
  );
  printPlotData(results);

  const svg = errorPlotSvg(
    results,
    `${runs.length} paragraphs, 2 layers x ${NUM_HEADS} heads; blocks of 32 values; ` +
      (args.centreKeys ? "keys centred for every format" : "keys not centred"),
  );
  await Deno.writeTextFile(args.out, svg);
  console.log(`\nPlot written to ${args.out}`);
  encoder.dispose();

  await printGeneration(progress, args.steps, device);

  const md = pick(results, [
    "f32",
    "f16",
    "TurboQuant 8-bit",
    "q8_0",
    "rot-q8_0",
    "TurboQuant 4-bit",
    "q4_0",
    "rot-q4_0",
    "TurboQuant 3-bit",
    "TurboQuant 2-bit",
  ]);
  console.log("\n## Markdown (for the README)\n");
  console.log(markdownTable(resultsTable(md, SHAPE)));
  const seconds = progress.elapsed();
  progress.log("done");
  console.log(`\nDemo took ${seconds.toFixed(1)} s.`);
}

if (import.meta.main) {
  try {
    await main(Deno.args);
  } catch (e) {
    console.error(`error: ${e instanceof Error ? e.stack ?? e.message : e}`);
    Deno.exit(1);
  }
}
