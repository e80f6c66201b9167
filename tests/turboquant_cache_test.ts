import assert from "node:assert/strict";
import {
  type EncodedVectors,
  requestTurboQuantDevice,
  type TurboQuantCodec,
  TurboQuantError,
  TurboQuantKVCache,
} from "../mod.ts";
import { concatTokens, gpuTest, Rng } from "./_helpers.ts";

/** Centred copy of head-major keys [heads, tokens, d] (f32 subtraction, as the GPU does). */
function centred(k: Float32Array, mean: Float32Array, heads: number, d: number): Float32Array {
  const out = new Float32Array(k.length);
  const tokens = k.length / (heads * d);
  for (let h = 0; h < heads; h++) {
    for (let t = 0; t < tokens; t++) {
      for (let i = 0; i < d; i++) {
        const j = (h * tokens + t) * d + i;
        out[j] = k[j] - mean[h * d + i];
      }
    }
  }
  return out;
}

/**
 * GPU codes must equal the CPU codec's. The one allowed difference is a near-tie of the scale
 * search: at most 1 block in 10,000, both choices within 1e-6 relative block error.
 */
function assertSameCodes(
  codec: TurboQuantCodec,
  x: Float32Array,
  gpu: EncodedVectors,
  what: string,
): void {
  const cpu = codec.encode(x);
  assert.equal(gpu.count, cpu.count, `${what}: count`);
  const d = codec.headDim, B = codec.blockSize, nb = codec.numBlocks;
  let differing = 0;
  for (let v = 0; v < cpu.count; v++) {
    const words = codec.wordsPerVector;
    let same = cpu.scales.subarray(v * nb, v * nb + nb).every((s, i) =>
      s === gpu.scales[v * nb + i]
    );
    for (let w = 0; w < words && same; w++) {
      same = cpu.indices[v * words + w] === gpu.indices[v * words + w];
    }
    if (cpu.signs && gpu.signs) {
      const sw = codec.signWordsPerVector;
      for (let w = 0; w < sw; w++) {
        assert.equal(gpu.signs[v * sw + w], cpu.signs[v * sw + w], `${what}: signs of vector ${v}`);
      }
      assert.equal(gpu.residualNorms![v], cpu.residualNorms![v], `${what}: residual norm ${v}`);
    }
    if (same) continue;
    const one = (e: EncodedVectors) =>
      codec.decode({
        count: 1,
        indices: e.indices.slice(v * words, (v + 1) * words),
        scales: e.scales.slice(v * nb, (v + 1) * nb),
        signs: e.signs?.slice(v * codec.signWordsPerVector, (v + 1) * codec.signWordsPerVector),
        residualNorms: e.residualNorms?.slice(v, v + 1),
      });
    const a = one(cpu), b = one(gpu);
    for (let blk = 0; blk < nb; blk++) {
      let ea = 0, eb = 0, n = 0;
      for (let i = blk * B; i < blk * B + B; i++) {
        const xi = x[v * d + i];
        ea += (xi - a[i]) ** 2, eb += (xi - b[i]) ** 2, n += xi * xi;
      }
      if (ea === eb) continue;
      differing++;
      assert.ok(
        Math.abs(ea - eb) <= 1e-6 * Math.max(n, 1e-30),
        `${what}: vector ${v} block ${blk}`,
      );
    }
  }
  const total = cpu.count * nb;
  assert.ok(
    differing <= Math.floor(total / 10000),
    `${what}: ${differing} of ${total} blocks differ`,
  );
}

gpuTest("GPU codes equal the CPU codec's (bits 1-8, headDim 48-128, both modes)", async (ctx) => {
  const rng = new Rng(1);
  const heads = 2, tokens = 37;
  for (const headDim of [48, 64, 96, 128]) {
    for (let bits = 1; bits <= 8; bits++) {
      for (const keyMode of ["mse", "prod"] as const) {
        if (keyMode === "prod" && bits < 2) continue;
        const cache = ctx.track(
          new TurboQuantKVCache(ctx.device, {
            numLayers: 1,
            numKvHeads: heads,
            headDim,
            keyBits: bits,
            valueBits: 9 - bits,
            keyMode,
            keyCentering: false,
            seed: bits,
          }),
        );
        const k = rng.gaussians(heads * tokens * headDim, 2);
        const v = rng.gaussians(heads * tokens * headDim);
        await cache.append(0, k, v);
        const { keys, values } = await cache.readEncoded(0);
        const what = `d ${headDim} K${bits} V${9 - bits} ${keyMode}`;
        assertSameCodes(cache.keyCodec, k, keys, `${what} keys`);
        assertSameCodes(cache.valueCodec, v, values, `${what} values`);
      }
    }
  }
});

gpuTest("key centring: codes equal the CPU codec on the centred keys", async (ctx) => {
  const rng = new Rng(2);
  const heads = 4, d = 64;
  const cache = ctx.track(
    new TurboQuantKVCache(ctx.device, { numLayers: 2, numKvHeads: heads, headDim: d }),
  );
  // Keys with a large shared offset, as real keys have.
  const offset = rng.gaussians(heads * d, 5);
  const first = rng.gaussians(heads * 50 * d);
  for (let i = 0; i < first.length; i++) first[i] += offset[i % d + Math.floor(i / (50 * d)) * d];
  const second = rng.gaussians(heads * 20 * d);
  await cache.append(1, first, first);
  await cache.append(1, second, second);
  const mean = (await cache.keyMean(1))!;
  // The mean is the first append's.
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < d; i++) {
      let s = 0;
      for (let t = 0; t < 50; t++) s += first[(h * 50 + t) * d + i];
      assert.ok(Math.abs(mean[h * d + i] - s / 50) < 1e-4, `mean ${h},${i}`);
    }
  }
  const all = concatTokens([first, second], heads, d);
  const { keys } = await cache.readEncoded(1);
  assertSameCodes(cache.keyCodec, centred(all, mean, heads, d), keys, "centred keys");
  // dequantize adds the mean back: CPU decode of the centred codes plus the mean.
  const { k } = await cache.dequantize(1);
  const want = centred(
    cache.keyCodec.decode(cache.keyCodec.encode(centred(all, mean, heads, d))),
    mean.map((m) => -m),
    heads,
    d,
  );
  assert.deepEqual(k, want);
  assert.equal(await cache.keyMean(0), null);
});

gpuTest("growth: capacities, contents preserved, equal to the CPU decode", async (ctx) => {
  const rng = new Rng(3);
  const heads = 2, d = 64;
  const cache = ctx.track(
    new TurboQuantKVCache(ctx.device, {
      numLayers: 1,
      numKvHeads: heads,
      headDim: d,
      keyCentering: false,
    }),
  );
  assert.equal(cache.capacity(0), 0);
  assert.equal(cache.memoryUsage(), cache.memoryUsage()); // tables only
  const tablesBytes = cache.memoryUsage();
  const parts: Float32Array[] = [];
  const check = async (expectLen: number) => {
    const all = concatTokens(parts, heads, d);
    const { k, v } = await cache.dequantize(0);
    assert.equal(cache.seqLen(0), expectLen);
    assert.deepEqual(k, cache.keyCodec.decode(cache.keyCodec.encode(all)));
    assert.deepEqual(v, cache.valueCodec.decode(cache.valueCodec.encode(all)));
    return k;
  };
  const add = async (tokens: number) => {
    const x = rng.gaussians(heads * tokens * d);
    parts.push(x);
    await cache.append(0, x, x);
  };
  await add(100);
  assert.equal(cache.capacity(0), 228);
  await add(128);
  assert.equal(cache.capacity(0), 228);
  const before = await check(228);
  await add(1);
  assert.equal(cache.capacity(0), 357);
  const after = await check(229);
  for (let h = 0; h < heads; h++) {
    assert.deepEqual(
      after.subarray(h * 229 * d, (h * 229 + 228) * d),
      before.subarray(h * 228 * d, (h + 1) * 228 * d),
    );
  }
  await add(1000);
  assert.equal(cache.capacity(0), 1536);
  await check(1229);
  const bytesPerToken =
    heads * (4 * cache.keyCodec.wordsPerVector + 4 * cache.valueCodec.wordsPerVector) +
    4 * Math.ceil(heads * cache.keyCodec.numBlocks / 2) +
    4 * Math.ceil(heads * cache.valueCodec.numBlocks / 2);
  assert.equal(cache.memoryUsage(), tablesBytes + 1536 * bytesPerToken);
  cache.validate();
});

gpuTest("truncate drops tokens for good; reset empties", async (ctx) => {
  const rng = new Rng(4);
  const heads = 2, d = 32;
  const cache = ctx.track(
    new TurboQuantKVCache(ctx.device, { numLayers: 2, numKvHeads: heads, headDim: d }),
  );
  const big = new Float32Array(heads * 10 * d).fill(1000);
  await cache.append(0, big, big);
  await cache.truncate(0);
  const x = rng.gaussians(heads * 2 * d);
  await cache.append(0, x, x);
  assert.equal(cache.seqLen(0), 2);
  const { k, v } = await cache.dequantize(0);
  assert.equal(k.length, heads * 2 * d);
  // The mean is now that of the 2 normal tokens, nothing of the 1000s is left.
  const mean = (await cache.keyMean(0))!;
  assert.ok(mean.every((m) => Math.abs(m) < 10));
  const kc = centred(x, mean, heads, d);
  const want = centred(
    cache.keyCodec.decode(cache.keyCodec.encode(kc)),
    mean.map((m) => -m),
    heads,
    d,
  );
  assert.deepEqual(k, want);
  assert.deepEqual(v, cache.valueCodec.decode(cache.valueCodec.encode(x)));
  const usage = cache.memoryUsage();
  await cache.truncate(1, 0);
  assert.equal(cache.seqLen(0), 1);
  assert.equal(cache.memoryUsage(), usage); // capacity is kept
  await cache.reset();
  assert.equal(cache.seqLen(0), 0);
  await assert.rejects(cache.truncate(5), TurboQuantError);
});

gpuTest("concurrent appends to 8 layers lose nothing", async (ctx) => {
  const rng = new Rng(5);
  const heads = 2, d = 32, layers = 8;
  const cache = ctx.track(
    new TurboQuantKVCache(ctx.device, {
      numLayers: layers,
      numKvHeads: heads,
      headDim: d,
      keyCentering: false,
    }),
  );
  const parts: Float32Array[][] = Array.from({ length: layers }, () => []);
  for (let round = 0; round < 50; round++) {
    await Promise.all(Array.from({ length: layers }, async (_, l) => {
      const tokens = rng.int(1, 12);
      const x = rng.gaussians(heads * tokens * d);
      parts[l].push(x);
      await cache.append(l, x, x);
      if (round % 10 === 9) await cache.dequantize(l);
    }));
  }
  for (let l = 0; l < layers; l++) {
    const all = concatTokens(parts[l], heads, d);
    const { k } = await cache.dequantize(l);
    assert.deepEqual(k, cache.keyCodec.decode(cache.keyCodec.encode(all)), `layer ${l}`);
  }
  cache.validate();
});

gpuTest("headDim 96 at 3 bits (rows not a multiple of 4 bytes) appends and grows", async (ctx) => {
  const rng = new Rng(6);
  const heads = 3, d = 96;
  const cache = ctx.track(
    new TurboQuantKVCache(ctx.device, {
      numLayers: 1,
      numKvHeads: heads,
      headDim: d,
      keyBits: 3,
      valueBits: 3,
      keyCentering: false,
    }),
  );
  const parts: Float32Array[] = [];
  for (const tokens of [1, 3, 200, 1, 3]) {
    const x = rng.gaussians(heads * tokens * d);
    parts.push(x);
    await cache.append(0, x, x);
  }
  const { v } = await cache.dequantize(0);
  assert.deepEqual(
    v,
    cache.valueCodec.decode(cache.valueCodec.encode(concatTokens(parts, heads, d))),
  );
  cache.validate();
});

gpuTest("more than 65,535 tokens dequantize correctly (Mesa's loop cap)", async (ctx) => {
  const rng = new Rng(7);
  const heads = 1, d = 32, tokens = 70_000;
  const cache = ctx.track(
    new TurboQuantKVCache(ctx.device, {
      numLayers: 1,
      numKvHeads: heads,
      headDim: d,
      keyCentering: true,
    }),
  );
  const x = rng.uniforms(heads * tokens * d);
  await cache.append(0, x, x);
  const { v } = await cache.dequantize(0);
  assert.deepEqual(v, cache.valueCodec.decode(cache.valueCodec.encode(x)));
  // The mean is over all 70,000 tokens (one workgroup per channel strides over them).
  const mean = (await cache.keyMean(0))!;
  for (let i = 0; i < d; i++) {
    let s = 0;
    for (let t = 0; t < tokens; t++) s += x[t * d + i];
    assert.ok(Math.abs(mean[i] - s / tokens) < 1e-4);
  }
});

gpuTest("bad input is refused before GPU work and changes nothing", async (ctx) => {
  const heads = 2, d = 16;
  const cache = ctx.track(
    new TurboQuantKVCache(ctx.device, { numLayers: 2, numKvHeads: heads, headDim: d }),
  );
  const ok = new Float32Array(heads * 3 * d).fill(0.5);
  await cache.append(0, ok, ok);
  const refuse = async (p: () => Promise<unknown>, pattern: RegExp) =>
    await assert.rejects(
      p,
      (e: unknown) => e instanceof TurboQuantError && pattern.test(e.message),
    );
  await refuse(() => cache.append(0, new Float32Array(heads * d + 1), ok), /k.length/);
  await refuse(() => cache.append(0, ok, new Float32Array(2)), /v.length/);
  await refuse(() => cache.append(2, ok, ok), /layer 2/);
  await refuse(() => cache.append(-1, ok, ok), /layer -1/);
  const nan = ok.slice();
  nan[(1 * 3 + 2) * d + 5] = NaN;
  await refuse(() => cache.append(0, nan, ok), /k\[head 1, token 2, dim 5\] is NaN/);
  const inf = ok.slice();
  inf[3] = -Infinity;
  await refuse(() => cache.append(0, ok, inf), /v\[head 0, token 0, dim 3\] is -Infinity/);
  await refuse(() => cache.attention(1, new Float32Array(d * heads), { numHeads: heads }), /empty/);
  await refuse(() => cache.attention(0, new Float32Array(d * 3), { numHeads: 3 }), /numHeads 3/);
  await refuse(
    () => cache.attention(0, new Float32Array(d * heads * 4), { numHeads: heads }),
    /qTokens 4/,
  );
  assert.equal(cache.seqLen(0), 3);
  assert.throws(
    () => new TurboQuantKVCache(ctx.device, { numLayers: 1, numKvHeads: 1, headDim: 20 }),
    /headDim 20/,
  );
  assert.throws(
    () =>
      new TurboQuantKVCache(ctx.device, { numLayers: 1, numKvHeads: 1, headDim: 64, keyBits: 9 }),
    /keyBits 9/,
  );
  assert.throws(
    () =>
      new TurboQuantKVCache(ctx.device, { numLayers: 1, numKvHeads: 1, headDim: 64, valueBits: 0 }),
    /valueBits 0/,
  );
  assert.throws(
    () => new TurboQuantKVCache(ctx.device, { numLayers: 0, numKvHeads: 1, headDim: 64 }),
    /numLayers 0/,
  );
  cache.validate();
  cache.destroy();
  await refuse(() => cache.append(0, ok, ok), /destroyed/);
  assert.throws(() => cache.validate(), /destroyed/);
});

gpuTest("a lost device makes later calls reject promptly", async () => {
  const device = await requestTurboQuantDevice();
  const cache = new TurboQuantKVCache(device, { numLayers: 1, numKvHeads: 1, headDim: 8 });
  const x = new Float32Array(8).fill(1);
  await cache.append(0, x, x);
  device.destroy();
  await device.lost;
  await assert.rejects(
    () => cache.append(0, x, x),
    (e: unknown) => e instanceof TurboQuantError && e.code === "device-lost",
  );
  await assert.rejects(() => cache.dequantize(0), /lost/);
  cache.destroy();
});
