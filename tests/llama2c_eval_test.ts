// The accuracy the KV-cache issue demands, on the real stories260k model over story.txt:
// teacher-forced perplexity, mean KL against exact f32 attention and top-1 agreement of the
// TurboQuant cache (CPU simulation; the GPU cache produces the same codes), against llama.cpp
// q4_0 on centred keys at the same 6 bits per value. Thresholds are the issue's; do not loosen.

import assert from "node:assert/strict";
import { cpuBackendFactory, teacherForced } from "../examples/llama2c/eval.ts";
import {
  type CacheSpec,
  formatGrid,
  type GridResult,
  type GridRow,
  gridRows,
  q4_0Blocks,
  runGrid,
} from "../examples/llama2c/eval_grid.ts";
import { DEFAULT_SCHEME, sanityCheck, symmetricEigen } from "../examples/llama2c/key_research.ts";
import { type LlamaModel, loadModel } from "../examples/llama2c/model.ts";
import { Tokenizer } from "../examples/llama2c/tokenizer.ts";
import { q4_0 } from "../bench/_baselines.ts";

const MODEL_URL = new URL("../../shared/models/stories260k.bin", import.meta.url);
const STORY_URL = new URL("../examples/llama2c/story.txt", import.meta.url);

let haveModel = false;
try {
  haveModel = (await Deno.stat(MODEL_URL)).isFile;
} catch {
  haveModel = false;
}
if (!haveModel) {
  console.log(`llama2c_eval_test: ${MODEL_URL.pathname} not found, skipping the real-model tests`);
}

let cached: Promise<{ model: LlamaModel; tokens: number[]; results: Map<string, GridResult> }>;
/** Loads the model and runs the rows the assertions need, once. */
function grid(): Promise<
  { model: LlamaModel; tokens: number[]; results: Map<string, GridResult> }
> {
  cached ??= (async () => {
    const model = await loadModel(MODEL_URL);
    const tokens = new Tokenizer(model.vocab).encode(await Deno.readTextFile(STORY_URL));
    const tq = (keyBits: number, valueBits: number, keyCentering = true): GridRow => ({
      name: `K${keyBits}/V${valueBits}${keyCentering ? " centred" : ""}`,
      kind: "turboquant",
      spec: { keyBits, valueBits, keyCentering } satisfies CacheSpec,
    });
    const rows: GridRow[] = [
      { name: "exact", kind: "exact" },
      tq(6, 4),
      tq(8, 4),
      tq(8, 3),
      tq(4, 4),
      tq(4, 4, false),
      {
        name: "q4_0 centred",
        kind: "q4_0",
        spec: { keyBits: 4, valueBits: 4, keyCentering: true },
      },
    ];
    const reference = await teacherForced(model, tokens, cpuBackendFactory);
    const list = await runGrid(model, tokens, { rows, reference, onProgress: () => {} });
    console.log(formatGrid(list));
    return { model, tokens, results: new Map(list.map((r) => [r.row.name, r])) };
  })();
  return cached;
}

async function row(name: string): Promise<GridResult> {
  const r = (await grid()).results.get(name);
  assert.ok(r, `row ${name} missing`);
  return r;
}

Deno.test("gridRows: exact, 8 bit pairs with and without centring, q4_0", () => {
  const rows = gridRows();
  assert.equal(rows.length, 1 + 16 + 1);
  assert.equal(rows[0].kind, "exact");
  assert.equal(rows.filter((r) => r.spec?.keyCentering).length, 9);
  assert.deepEqual(rows.at(-1)?.spec, { keyBits: 4, valueBits: 4, keyCentering: true });
});

Deno.test("q4_0Blocks at block 32 equals the llama.cpp baseline in bench/_baselines.ts", () => {
  let s = 12345;
  const x = Float32Array.from({ length: 32 * 40 }, () => {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    return (s / 2 ** 32 - 0.5) * 8;
  });
  assert.deepEqual(q4_0Blocks(x, 32), q4_0(x, 64));
  // Block 8 (a head_dim-8 head): 16 levels of the block's own scale.
  const y = q4_0Blocks(x, 8);
  for (let o = 0; o < x.length; o += 8) {
    const amax = Math.max(...x.subarray(o, o + 8).map(Math.abs));
    for (let j = 0; j < 8; j++) assert.ok(Math.abs(y[o + j] - x[o + j]) <= amax / 8 + 1e-3);
  }
});

Deno.test("symmetricEigen diagonalises a symmetric matrix", () => {
  const n = 4;
  const a = Float64Array.from([4, 1, 0.5, 0, 1, 3, 0.2, 0.1, 0.5, 0.2, 2, 0.3, 0, 0.1, 0.3, 1]);
  const { values, vectors } = symmetricEigen(a, n);
  for (let k = 0; k < n; k++) {
    for (let i = 0; i < n; i++) {
      let av = 0;
      for (let j = 0; j < n; j++) av += a[i * n + j] * vectors[j * n + k];
      assert.ok(Math.abs(av - values[k] * vectors[i * n + k]) < 1e-9);
    }
  }
});

Deno.test({
  name: "K6/V4 centred: mean KL < 0.01 and perplexity within 2%",
  ignore: !haveModel,
  async fn() {
    const r = await row("K6/V4 centred");
    assert.ok(r.comparison.meanKl < 0.01, `mean KL ${r.comparison.meanKl}`);
    assert.ok(
      Math.abs(r.comparison.perplexityChange) < 0.02,
      `ppl ${r.comparison.perplexityChange}`,
    );
    assert.equal(r.keyBitsPerValue, 8); // 6 + one f16 scale per 8 values
  },
});

Deno.test({
  name: "K8/V4 centred: top-1 agreement >= 97%",
  ignore: !haveModel,
  async fn() {
    const r = await row("K8/V4 centred");
    assert.ok(r.comparison.top1Agreement >= 0.97, `top-1 ${r.comparison.top1Agreement}`);
  },
});

Deno.test({
  name: "K8/V3 centred: perplexity within 2%",
  ignore: !haveModel,
  async fn() {
    const r = await row("K8/V3 centred");
    assert.ok(
      Math.abs(r.comparison.perplexityChange) < 0.02,
      `ppl ${r.comparison.perplexityChange}`,
    );
  },
});

Deno.test({
  name: "K4/V4 centred: KL below q4_0 on centred keys at the same 6 bits per value",
  ignore: !haveModel,
  async fn() {
    const tq = await row("K4/V4 centred");
    const q4 = await row("q4_0 centred");
    assert.equal(tq.keyBitsPerValue, q4.keyBitsPerValue);
    assert.equal(tq.valueBitsPerValue, q4.valueBitsPerValue);
    assert.ok(
      tq.comparison.meanKl < q4.comparison.meanKl,
      `TurboQuant ${tq.comparison.meanKl} vs q4_0 ${q4.comparison.meanKl}`,
    );
  },
});

Deno.test({
  name: "key centring at least halves the KL of 4-bit keys",
  ignore: !haveModel,
  async fn() {
    const on = await row("K4/V4 centred");
    const off = await row("K4/V4");
    assert.ok(
      on.comparison.meanKl <= off.comparison.meanKl / 2,
      `centred ${on.comparison.meanKl} vs raw ${off.comparison.meanKl}`,
    );
  },
});

Deno.test({
  name: "key_research's backend reproduces SimulatedCodecBackend on the default scheme",
  ignore: !haveModel,
  async fn() {
    const { model, tokens } = await grid();
    assert.equal(DEFAULT_SCHEME.centre, "first");
    assert.ok((await sanityCheck(model, tokens)) < 1e-5);
  },
});
