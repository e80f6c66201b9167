import assert from "node:assert/strict";
import { cpuAttention } from "../src/attention/cpu_reference.ts";
import {
  ITERATION_BUDGET,
  iterationsPerInvocation,
  planAttention,
} from "../src/attention/uncompressed_attention.ts";
import { reducePasses } from "../src/attention/split_k_reduce.ts";
import {
  UncompressedKVCache,
  type UncompressedKVCacheOptions,
} from "../src/cache/uncompressed_kv_cache.ts";
import { grownCapacity } from "../src/cache/_layer_storage.ts";
import { TurboQuantError, type TurboQuantErrorCode } from "../src/errors.ts";
import { requestTurboQuantDevice } from "../src/gpu/device.ts";
import { createBuffer, readBuffer } from "../src/gpu/_buffers.ts";
import {
  assertRelativeError,
  assertSameValues,
  concatTokens,
  f16Rounded,
  gpuTest,
  Rng,
  sliceTokens,
} from "./_helpers.ts";

const isTq = (code: TurboQuantErrorCode, pattern?: RegExp) => (e: unknown): boolean => {
  assert.ok(e instanceof TurboQuantError, `expected TurboQuantError, got ${e}`);
  assert.equal(e.code, code, e.message);
  if (pattern) assert.match(e.message, pattern);
  return true;
};

/** Relative error bound of the f32 kernel against the float64 reference. */
const F32_TOL = 1e-5;

/** A cache whose binding limit is small: windows, split appends and window-crossing reads. */
class SmallBindingCache extends UncompressedKVCache {
  constructor(device: GPUDevice, options: UncompressedKVCacheOptions, fanIn?: number) {
    super(device, options);
    if (fanIn) this.attentionOverrides = { fanIn, chunkTokens: 64 };
  }
  protected override bindingLimitBytes(): number {
    // 512 tokens per window at 2 KV heads x 64 f32.
    return 512 * 2 * 64 * 4;
  }
}

/** A cache whose buffers may hold only 1 MiB. */
class TinyBufferCache extends UncompressedKVCache {
  protected override bufferLimitBytes(): number {
    return 1 << 20;
  }
}

interface Shape {
  numKvHeads: number;
  headDim: number;
  numHeads: number;
}

/** Checks decode, causal prefill and non-causal prefill against the CPU reference. */
async function checkAttention(
  cache: UncompressedKVCache,
  layer: number,
  k: Float32Array,
  v: Float32Array,
  shape: Shape,
  rng: Rng,
  tol: number,
  label: string,
): Promise<void> {
  const seqLen = cache.seqLen(layer);
  const prefill = Math.min(seqLen, 5);
  const cases: [string, number, boolean][] = [
    ["decode", 1, false],
    ["causal prefill", prefill, true],
    ["non-causal prefill", prefill, false],
  ];
  for (const [name, qTokens, causal] of cases) {
    const q = rng.gaussians(shape.numHeads * qTokens * shape.headDim);
    const got = await cache.attention(layer, q, { numHeads: shape.numHeads, causal });
    const want = cpuAttention(q, k, v, { ...shape, causal });
    assertRelativeError(got, want, tol, `${label} ${name} seqLen ${seqLen} qTokens ${qTokens}`);
  }
}

gpuTest("attention matches the CPU reference (f32, lengths 1..4096)", async ({ device, t }) => {
  const rng = new Rng(11);
  for (const headDim of [64, 128]) {
    for (const numKvHeads of [2, 8]) {
      await t.step(`headDim ${headDim}, 8 heads / ${numKvHeads} KV heads`, async () => {
        const shape = { numKvHeads, headDim, numHeads: 8 };
        const cache = new UncompressedKVCache(device, { numLayers: 1, numKvHeads, headDim });
        try {
          const ks: Float32Array[] = [];
          const vs: Float32Array[] = [];
          let len = 0;
          for (const target of [1, 127, 128, 129, 4096]) {
            const n = target - len;
            const k = rng.gaussians(numKvHeads * n * headDim);
            const v = rng.gaussians(numKvHeads * n * headDim);
            await cache.append(0, k, v);
            ks.push(k);
            vs.push(v);
            len = target;
            assert.equal(cache.seqLen(0), target);
            const kAll = concatTokens(ks, numKvHeads, headDim);
            const vAll = concatTokens(vs, numKvHeads, headDim);
            await checkAttention(cache, 0, kAll, vAll, shape, rng, F32_TOL, "f32");
          }
          cache.validate();
        } finally {
          cache.destroy();
        }
      });
    }
  }
});

gpuTest("f16 storage matches the reference on f16-rounded K/V", async ({ device, t }) => {
  const rng = new Rng(12);
  for (const [headDim, numKvHeads] of [[64, 2], [128, 8]]) {
    await t.step(`headDim ${headDim}, ${numKvHeads} KV heads`, async () => {
      const shape = { numKvHeads, headDim, numHeads: 8 };
      const cache = new UncompressedKVCache(device, {
        numLayers: 1,
        numKvHeads,
        headDim,
        dtype: "f16",
      });
      try {
        for (const seqLen of [129, 4096]) {
          await cache.reset();
          const k = rng.gaussians(numKvHeads * seqLen * headDim);
          const v = rng.gaussians(numKvHeads * seqLen * headDim);
          await cache.append(0, k, v);
          const kr = f16Rounded(k);
          const vr = f16Rounded(v);
          const d = await cache.dequantize(0);
          assertSameValues(d.k, kr, "dequantize returns the f16-rounded keys");
          assertSameValues(d.v, vr, "dequantize returns the f16-rounded values");
          await checkAttention(cache, 0, kr, vr, shape, rng, F32_TOL, "f16");
        }
        assert.equal(cache.memoryUsage(), 2 * cache.capacity(0) * numKvHeads * headDim * 2);
      } finally {
        cache.destroy();
      }
    });
  }
});

gpuTest("70,000 tokens: past Mesa's loop cap and the 128 MiB binding limit", async ({ device }) => {
  const rng = new Rng(13);
  const seqLen = 70_000;
  for (const [dtype, numKvHeads, headDim] of [["f32", 8, 64], ["f16", 2, 128]] as const) {
    const shape = { numKvHeads, headDim, numHeads: 8 };
    const cache = new UncompressedKVCache(device, { numLayers: 1, numKvHeads, headDim, dtype });
    try {
      let k = rng.uniforms(numKvHeads * seqLen * headDim, 2);
      let v = rng.uniforms(numKvHeads * seqLen * headDim, 2);
      // Two appends, so the second one grows the buffers past the binding limit (f32 case).
      const half = 40_000;
      await cache.append(
        0,
        sliceTokens(k, numKvHeads, seqLen, headDim, 0, half),
        sliceTokens(v, numKvHeads, seqLen, headDim, 0, half),
      );
      await cache.append(
        0,
        sliceTokens(k, numKvHeads, seqLen, headDim, half, seqLen),
        sliceTokens(v, numKvHeads, seqLen, headDim, half, seqLen),
      );
      if (dtype === "f32") {
        assert.ok(
          cache.capacity(0) * numKvHeads * headDim * 4 > device.limits.maxStorageBufferBindingSize,
          "buffer exceeds one binding",
        );
      } else {
        k = f16Rounded(k);
        v = f16Rounded(v);
      }
      for (const [qTokens, causal] of [[1, false], [3, true]] as const) {
        const q = rng.gaussians(shape.numHeads * qTokens * headDim);
        const got = await cache.attention(0, q, { numHeads: 8, causal });
        const want = cpuAttention(q, k, v, { ...shape, causal });
        assertRelativeError(got, want, F32_TOL, `${dtype} 70k qTokens ${qTokens}`);
      }
      const d = await cache.dequantize(0);
      assertSameValues(d.k.subarray(d.k.length - 1000), k.subarray(k.length - 1000));
      cache.validate();
    } finally {
      cache.destroy();
    }
  }
});

gpuTest("binding windows, split appends and multi-pass merges agree", async ({ device, t }) => {
  const rng = new Rng(14);
  const numKvHeads = 2;
  const headDim = 64;
  const shape = { numKvHeads, headDim, numHeads: 8 };
  for (const fanIn of [undefined, 3]) {
    await t.step(`fanIn ${fanIn ?? "default"}`, async () => {
      const cache = new SmallBindingCache(device, { numLayers: 1, numKvHeads, headDim }, fanIn);
      try {
        const ks: Float32Array[] = [];
        const vs: Float32Array[] = [];
        // 700 crosses the 512-token window; 1000 more is split over windows and jobs.
        for (const n of [300, 400, 1000, 37]) {
          const k = rng.gaussians(numKvHeads * n * headDim);
          const v = rng.gaussians(numKvHeads * n * headDim);
          await cache.append(0, k, v);
          ks.push(k);
          vs.push(v);
        }
        const k = concatTokens(ks, numKvHeads, headDim);
        const v = concatTokens(vs, numKvHeads, headDim);
        const d = await cache.dequantize(0);
        assertSameValues(d.k, k);
        assertSameValues(d.v, v);
        await checkAttention(cache, 0, k, v, shape, rng, F32_TOL, "windows");
        cache.validate();
      } finally {
        cache.destroy();
      }
    });
  }
  await t.step("GPU-buffer appends are split with copies", async () => {
    const cache = new SmallBindingCache(device, { numLayers: 1, numKvHeads, headDim });
    const n = 900;
    const k = rng.gaussians(numKvHeads * n * headDim);
    const v = rng.gaussians(numKvHeads * n * headDim);
    const kb = createBuffer(device, "turboquant/test-k", k.byteLength, undefined, k);
    const vb = createBuffer(device, "turboquant/test-v", v.byteLength, undefined, v);
    try {
      await cache.appendBuffers(0, kb, vb, 300);
      await cache.truncate(100);
      await cache.appendBuffers(0, kb, vb, n); // starts at 100, crosses 512
      const d = await cache.dequantize(0);
      // The first append read kb as [heads, 300, headDim].
      const first = sliceTokens(k.subarray(0, numKvHeads * 300 * headDim), 2, 300, 64, 0, 100);
      const want = concatTokens([first, k], 2, 64);
      assertSameValues(d.k, want);
      const noCopy = device.createBuffer({
        label: "turboquant/test-storage-only",
        size: k.byteLength,
        usage: GPUBufferUsage.STORAGE,
      });
      await assert.rejects(
        cache.appendBuffers(0, noCopy, noCopy, n),
        isTq("invalid-argument", /COPY_SRC/),
      );
      noCopy.destroy();
      assert.equal(cache.seqLen(0), 100 + n);
    } finally {
      kb.destroy();
      vb.destroy();
      cache.destroy();
    }
  });
});

gpuTest("GPU-buffer variants match the Float32Array ones", async ({ device }) => {
  const rng = new Rng(15);
  const numKvHeads = 2;
  const headDim = 64;
  const n = 300;
  const cache = new UncompressedKVCache(device, { numLayers: 2, numKvHeads, headDim });
  const k = rng.gaussians(numKvHeads * n * headDim);
  const v = rng.gaussians(numKvHeads * n * headDim);
  const q = rng.gaussians(8 * 2 * headDim);
  const kb = createBuffer(device, "turboquant/test-k", k.byteLength, undefined, k);
  const vb = createBuffer(device, "turboquant/test-v", v.byteLength, undefined, v);
  const qb = createBuffer(device, "turboquant/test-q", q.byteLength, undefined, q);
  try {
    await cache.append(0, k, v);
    await cache.appendBuffers(1, kb, vb, n);
    const want = await cache.attention(0, q, { numHeads: 8, causal: true });
    const out = await cache.attentionBuffers(1, qb, { numHeads: 8, qTokens: 2, causal: true });
    const got = new Float32Array(await readBuffer(device, out));
    out.destroy();
    assertSameValues(got, want);
    const given = createBuffer(device, "turboquant/test-out", q.byteLength);
    assert.equal(
      await cache.attentionBuffers(1, qb, { numHeads: 8, qTokens: 2, causal: true, out: given }),
      given,
    );
    assertSameValues(new Float32Array(await readBuffer(device, given)), want);
    given.destroy();
  } finally {
    kb.destroy();
    vb.destroy();
    qb.destroy();
    cache.destroy();
  }
});

gpuTest("growth: capacities follow needed + max(needed / 4, 128)", async ({ device }) => {
  const rng = new Rng(16);
  const numKvHeads = 2;
  const headDim = 8;
  const bpt = numKvHeads * headDim * 4 * 2;
  const cache = new UncompressedKVCache(device, { numLayers: 2, numKvHeads, headDim });
  try {
    assert.equal(cache.capacity(0), 0);
    assert.equal(cache.memoryUsage(), 0);
    cache.validate();
    const ks: Float32Array[] = [];
    for (const [n, capacity] of [[100, 228], [128, 228], [1, 357], [1000, 1536]]) {
      const k = rng.gaussians(numKvHeads * n * headDim);
      await cache.append(0, k, k);
      ks.push(k);
      assert.equal(cache.capacity(0), capacity, `after +${n}`);
      assert.equal(cache.capacity(1), 0);
      assert.equal(cache.memoryUsage(), capacity * bpt);
      cache.validate();
      const d = await cache.dequantize(0);
      assertSameValues(d.k, concatTokens(ks, numKvHeads, headDim), "contents preserved");
    }
    assert.equal(grownCapacity(1229, 1_000_000), 1536);
    assert.equal(grownCapacity(1229, 1300), 1300);
  } finally {
    cache.destroy();
  }
  const pre = new UncompressedKVCache(device, {
    numLayers: 3,
    numKvHeads,
    headDim,
    initialCapacity: 50,
  });
  try {
    assert.equal(pre.capacity(2), 50);
    assert.equal(pre.memoryUsage(), 3 * 50 * bpt);
    const fill = rng.gaussians(numKvHeads * 50 * headDim);
    await pre.append(1, fill, fill);
    assert.equal(pre.capacity(1), 50, "fits without growing");
    await pre.append(1, rng.gaussians(numKvHeads * headDim), rng.gaussians(numKvHeads * headDim));
    assert.equal(pre.capacity(1), 51 + 128);
    pre.validate();
  } finally {
    pre.destroy();
  }
});

gpuTest("truncate: later appends overwrite, reads never see dropped tokens", async ({ device }) => {
  const rng = new Rng(17);
  const numKvHeads = 2;
  const headDim = 16;
  const shape = { numKvHeads, headDim, numHeads: 4 };
  const cache = new UncompressedKVCache(device, { numLayers: 2, numKvHeads, headDim });
  try {
    const big = new Float32Array(numKvHeads * 10 * headDim).fill(1000);
    await cache.append(0, big, big);
    await cache.append(1, big, big);
    const capacity = cache.capacity(0);
    await cache.truncate(0, 0);
    assert.equal(cache.seqLen(0), 0);
    assert.equal(cache.seqLen(1), 10);
    const k = rng.gaussians(numKvHeads * 2 * headDim);
    const v = rng.gaussians(numKvHeads * 2 * headDim);
    await cache.append(0, k, v);
    assert.equal(cache.seqLen(0), 2);
    const d = await cache.dequantize(0);
    assertSameValues(d.k, k);
    assertSameValues(d.v, v);
    const q = rng.gaussians(4 * headDim);
    assertRelativeError(
      await cache.attention(0, q, { numHeads: 4 }),
      cpuAttention(q, k, v, shape),
      F32_TOL,
      "only the two new tokens",
    );
    assert.equal(cache.capacity(0), capacity);
    assert.equal(cache.memoryUsage(), 2 * capacity * numKvHeads * headDim * 4 * 2);
    // Every layer at once; then a rollback within a layer.
    await cache.truncate(1);
    assert.deepEqual([cache.seqLen(0), cache.seqLen(1)], [1, 1]);
    await assert.rejects(cache.truncate(5), isTq("invalid-argument", /length 5 > seqLen 1/));
    await cache.reset();
    assert.deepEqual([cache.seqLen(0), cache.seqLen(1)], [0, 0]);
    assert.equal(cache.capacity(1), capacity, "reset keeps capacity");
    cache.validate();
  } finally {
    cache.destroy();
  }
});

gpuTest("concurrency: Promise.all over 8 layers loses nothing", async ({ device }) => {
  const rng = new Rng(18);
  const numLayers = 8;
  const numKvHeads = 2;
  const headDim = 8;
  const cache = new UncompressedKVCache(device, { numLayers, numKvHeads, headDim });
  const expected: Float32Array[][] = Array.from({ length: numLayers }, () => []);
  let counter = 0;
  try {
    for (let round = 0; round < 6; round++) {
      const ops: Promise<unknown>[] = [];
      for (let l = 0; l < numLayers; l++) {
        // Two appends per layer per round, queued on the same lock, plus a read.
        for (let j = 0; j < 2; j++) {
          const n = rng.int(1, 200);
          const k = new Float32Array(numKvHeads * n * headDim);
          for (let i = 0; i < k.length; i++) k[i] = l * 1e4 + (counter++ % 9973);
          expected[l].push(k.slice());
          ops.push(cache.append(l, k, k));
          k.fill(-1); // appends copy their input at call time
        }
        ops.push(cache.dequantize(l));
      }
      await Promise.all(ops);
    }
    for (let l = 0; l < numLayers; l++) {
      const want = concatTokens(expected[l], numKvHeads, headDim);
      const d = await cache.dequantize(l);
      assert.equal(cache.seqLen(l), want.length / (numKvHeads * headDim));
      assertSameValues(d.k, want, `layer ${l}`);
    }
    cache.validate();
  } finally {
    cache.destroy();
  }
});

gpuTest("bad inputs throw TurboQuantError before GPU work", async ({ device }) => {
  const numKvHeads = 2;
  const headDim = 8;
  const cache = new UncompressedKVCache(device, { numLayers: 2, numKvHeads, headDim });
  const ok = new Float32Array(numKvHeads * 3 * headDim).fill(0.5);
  try {
    await assert.rejects(
      cache.attention(0, new Float32Array(4 * headDim), { numHeads: 4 }),
      isTq("invalid-state", /seqLen 0/),
    );
    await cache.append(0, ok, ok);
    const bad = (k: unknown, v: unknown = ok) =>
      cache.append(0, k as Float32Array, v as Float32Array);
    await assert.rejects(bad(new Float32Array(5)), isTq("invalid-argument", /k\.length 5/));
    await assert.rejects(bad(new Float32Array(0)), isTq("invalid-argument", /k\.length 0/));
    await assert.rejects(bad(ok, new Float32Array(16)), isTq("invalid-argument", /v\.length 16/));
    await assert.rejects(bad([1, 2, 3]), isTq("invalid-argument", /not a Float32Array/));
    const nan = ok.slice();
    nan[1 * 3 * headDim + 2 * headDim + 5] = NaN;
    await assert.rejects(bad(nan), isTq("invalid-argument", /k\[head 1, token 2, dim 5\] is NaN/));
    const inf = ok.slice();
    inf[7] = -Infinity;
    await assert.rejects(
      bad(ok, inf),
      isTq("invalid-argument", /v\[head 0, token 0, dim 7\] is -Infinity/),
    );
    for (const layer of [-1, 2, 0.5, NaN]) {
      await assert.rejects(cache.append(layer, ok, ok), isTq("invalid-argument", /layer/));
    }
    assert.throws(() => cache.seqLen(7), isTq("invalid-argument", /layer 7/));
    const q = new Float32Array(4 * headDim);
    await assert.rejects(
      cache.attention(0, q, { numHeads: 3 }),
      isTq("invalid-argument", /numHeads 3/),
    );
    await assert.rejects(
      cache.attention(0, q.subarray(1), { numHeads: 4 }),
      isTq("invalid-argument", /q\.length 31/),
    );
    await assert.rejects(
      cache.attention(0, new Float32Array(4 * 4 * headDim), { numHeads: 4 }),
      isTq("invalid-argument", /qTokens 4 > seqLen 3/),
    );
    await assert.rejects(
      cache.attention(0, q, { numHeads: 4, scale: NaN }),
      isTq("invalid-argument", /scale/),
    );
    await assert.rejects(
      cache.attention(0, q, { numHeads: 4, causal: 1 as unknown as boolean }),
      isTq("invalid-argument", /causal/),
    );
    const nanQ = q.slice();
    nanQ[3] = NaN;
    await assert.rejects(
      cache.attention(0, nanQ, { numHeads: 4 }),
      isTq("invalid-argument", /q\[head 0/),
    );
    await assert.rejects(cache.truncate(-1), isTq("invalid-argument", /length -1/));
    await assert.rejects(cache.truncate(4, 0), isTq("invalid-argument", /length 4 > seqLen 3/));
    const uniformOnly = device.createBuffer({
      label: "turboquant/test-uniform",
      size: 256,
      usage: GPUBufferUsage.UNIFORM,
    });
    const small = device.createBuffer({
      label: "turboquant/test-small",
      size: 16,
      usage: GPUBufferUsage.STORAGE,
    });
    await assert.rejects(
      cache.appendBuffers(0, uniformOnly, uniformOnly, 1),
      isTq("invalid-argument", /STORAGE/),
    );
    await assert.rejects(
      cache.appendBuffers(0, small, small, 1),
      isTq("invalid-argument", /16 bytes, needs 64/),
    );
    await assert.rejects(
      cache.appendBuffers(0, small, small, 0),
      isTq("invalid-argument", /tokens 0/),
    );
    await assert.rejects(
      cache.attentionBuffers(0, small, { numHeads: 4, qTokens: 1 }),
      isTq("invalid-argument", /needs 128/),
    );
    uniformOnly.destroy();
    small.destroy();
    assert.equal(cache.seqLen(0), 3, "nothing changed");
    assert.equal(cache.seqLen(1), 0);
    cache.validate();
    const ctor = (o: object) => () =>
      new UncompressedKVCache(device, { numLayers: 1, numKvHeads: 1, headDim: 8, ...o });
    assert.throws(ctor({ headDim: 12 }), isTq("invalid-argument", /headDim 12/));
    assert.throws(ctor({ headDim: 1024 }), isTq("invalid-argument", /headDim 1024/));
    assert.throws(ctor({ numLayers: 0 }), isTq("invalid-argument", /numLayers 0/));
    assert.throws(ctor({ numKvHeads: 1.5 }), isTq("invalid-argument", /numKvHeads 1.5/));
    assert.throws(ctor({ dtype: "bf16" }), isTq("invalid-argument", /dtype "bf16"/));
    assert.throws(ctor({ initialCapacity: -1 }), isTq("invalid-argument", /initialCapacity -1/));
    assert.throws(ctor({ initialCapacity: 1e9 }), isTq("out-of-memory", /initialCapacity/));
  } finally {
    cache.destroy();
  }
});

gpuTest("buffer limit: refused up front with the token count it can hold", async ({ device }) => {
  const numKvHeads = 2;
  const headDim = 64;
  const cache = new TinyBufferCache(device, { numLayers: 1, numKvHeads, headDim });
  const maxTokens = (1 << 20) / (numKvHeads * headDim * 4);
  assert.equal(cache.maxTokens, maxTokens);
  try {
    const n = maxTokens - 10;
    const k = new Float32Array(numKvHeads * n * headDim).fill(0.25);
    await cache.append(0, k, k);
    assert.equal(cache.capacity(0), maxTokens, "growth clamps to the limit");
    const more = new Float32Array(numKvHeads * 11 * headDim);
    await assert.rejects(
      cache.append(0, more, more),
      isTq("out-of-memory", new RegExp(`at most ${maxTokens} tokens`)),
    );
    assert.equal(cache.seqLen(0), n);
    await cache.append(
      0,
      more.subarray(0, numKvHeads * 10 * headDim),
      more.subarray(0, numKvHeads * 10 * headDim),
    );
    assert.equal(cache.seqLen(0), maxTokens);
    cache.validate();
  } finally {
    cache.destroy();
  }
});

gpuTest("destroyed cache and lost device reject promptly", async ({ device }) => {
  const kv = new Float32Array(8).fill(1);
  const cache = new UncompressedKVCache(device, { numLayers: 1, numKvHeads: 1, headDim: 8 });
  await cache.append(0, kv, kv);
  cache.destroy();
  cache.destroy();
  assert.equal(cache.memoryUsage(), 0);
  await assert.rejects(cache.append(0, kv, kv), isTq("destroyed"));
  await assert.rejects(cache.attention(0, kv, { numHeads: 1 }), isTq("destroyed"));
  await assert.rejects(cache.dequantize(0), isTq("destroyed"));
  await assert.rejects(cache.reset(), isTq("destroyed"));
  assert.throws(() => cache.validate(), isTq("invalid-state", /destroyed/));

  const other = await requestTurboQuantDevice({ label: "turboquant/test-doomed" });
  const doomed = new UncompressedKVCache(other, { numLayers: 1, numKvHeads: 1, headDim: 8 });
  await doomed.append(0, kv, kv);
  other.destroy();
  await other.lost;
  await assert.rejects(doomed.append(0, kv, kv), isTq("device-lost"));
  await assert.rejects(doomed.attention(0, kv, { numHeads: 1 }), isTq("device-lost"));
  assert.equal(doomed.seqLen(0), 1);
  doomed.destroy();
});

Deno.test("attention plan: bounded loops, windows and row batches", () => {
  for (const headDim of [8, 64, 128, 256, 512]) {
    for (const f16 of [false, true]) {
      for (const lanes of [8, 64]) {
        for (const rows of [1, 4, 32]) {
          const plan = planAttention({
            headDim,
            f16,
            numKvHeads: 8,
            groupSize: rows,
            qTokens: 1,
            windows: [{ start: 0, tokens: 65536 }, { start: 65536, tokens: 100 }],
            bindingLimit: 1 << 27,
            lanes,
          });
          assert.ok(plan.chunkTokens <= plan.cmax);
          assert.ok(plan.windows.every((w) => w.chunks * plan.chunkTokens >= w.tokens));
          assert.equal(plan.rowBatch, rows, "decode rows fit one batch");
          // The longest cache a 2 GiB buffer holds, in 128 MiB windows.
          const bpt = 8 * headDim * (f16 ? 2 : 4);
          const windowTokens = Math.floor((1 << 27) / bpt / 256) * 256;
          const maxTokens = Math.floor(2 ** 31 / bpt);
          const windows = [];
          for (let start = 0; start < maxTokens; start += windowTokens) {
            windows.push({ start, tokens: Math.min(windowTokens, maxTokens - start) });
          }
          const huge = planAttention({
            headDim,
            f16,
            numKvHeads: 8,
            groupSize: rows,
            qTokens: 1,
            windows,
            bindingLimit: 1 << 27,
            lanes,
          });
          assert.ok(
            huge.rowBatch === rows || huge.rowBatch < huge.qb || huge.rowBatch % huge.qb === 0,
          );
          assert.ok(iterationsPerInvocation(huge, huge.chunkTokens) <= ITERATION_BUDGET);
        }
      }
    }
  }
  const prefill = planAttention({
    headDim: 128,
    f16: false,
    numKvHeads: 8,
    groupSize: 4,
    qTokens: 4096,
    windows: [{ start: 0, tokens: 32768 }, { start: 32768, tokens: 100 }],
    bindingLimit: 1 << 27,
    lanes: 8,
  });
  assert.ok(prefill.rowBatch < prefill.rowsTotal && prefill.rowBatch % prefill.qb === 0);
  assert.equal(prefill.windows[1].slotBase, prefill.windows[0].chunks);
  assert.deepEqual(reducePasses(10, 3).map((p) => p.numOut), [4, 2, 1]);
  assert.deepEqual(reducePasses(3, 3).map((p) => p.numOut), [1]);
});
