import assert from "node:assert/strict";
import { type CodecOptions, lloydMaxCodebook, TurboQuantCodec, TurboQuantError } from "../mod.ts";
import { SplitMix32 } from "../src/codec/_prng.ts";
import { packCodes, unpackCodes, wordsFor } from "../src/codec/packing.ts";

function gaussian(n: number, seed: number): Float32Array {
  const rng = new SplitMix32(seed);
  return Float32Array.from({ length: n }, () => rng.nextGaussian());
}

/** Mean over vectors of ||x - x~||^2 / ||x||^2. */
function normalisedMse(codec: TurboQuantCodec, x: Float32Array): number {
  const y = codec.decode(codec.encode(x));
  const d = codec.headDim;
  let total = 0;
  for (let v = 0; v < x.length / d; v++) {
    let err = 0, norm = 0;
    for (let i = v * d; i < v * d + d; i++) {
      err += (x[i] - y[i]) ** 2;
      norm += x[i] ** 2;
    }
    total += err / norm;
  }
  return total / (x.length / d);
}

Deno.test("codebooks match the exact Lloyd-Max figures", () => {
  const half = (d: number, b: number) => {
    const c = lloydMaxCodebook(d, b).centroids;
    return Array.from(c.subarray(c.length / 2));
  };
  const expect = (got: number[], want: number[], scale = 1) =>
    want.forEach((w, i) => assert.ok(Math.abs(got[i] * scale - w) < 1e-4, `${got[i]} vs ${w}`));
  expect(half(128, 3), [0.02160, 0.06659, 0.11814, 0.18840]);
  expect(half(32, 3), [0.04285, 0.13176, 0.23246, 0.36627]);
  // Gaussian limit, times sqrt(d), at a very large d.
  const d = 1 << 20;
  expect(half(d, 1), [0.7979], Math.sqrt(d));
  expect(half(d, 2), [0.4528, 1.5104], Math.sqrt(d));
  expect(half(d, 3), [0.2451, 0.7560, 1.3440, 2.1520], Math.sqrt(d));
  expect(
    half(d, 4),
    [0.1284, 0.3881, 0.6568, 0.9423, 1.2562, 1.6180, 2.0690, 2.7326],
    Math.sqrt(d),
  );
  // Symmetric and ascending for every bit width.
  for (let b = 1; b <= 8; b++) {
    const c = lloydMaxCodebook(64, b).centroids;
    for (let i = 0; i < c.length; i++) {
      assert.equal(c[i], -c[c.length - 1 - i]);
      if (i > 0) assert.ok(c[i] > c[i - 1]);
    }
  }
});

Deno.test("normalised MSE matches the paper at headDim 128 (whole-vector blocks)", () => {
  const x = gaussian(4096 * 128, 1);
  const want = [0.361, 0.116, 0.034, 0.0093];
  for (let bits = 1; bits <= 4; bits++) {
    const codec = new TurboQuantCodec({
      headDim: 128,
      bits,
      blockSize: 128,
      normCorrection: false,
      scaleSearch: 1,
    });
    const mse = normalisedMse(codec, x);
    assert.ok(Math.abs(mse / want[bits - 1] - 1) < 0.03, `bits ${bits}: ${mse}`);
  }
});

Deno.test("scale search beats norm scales on Gaussian blocks of 32 at 4 bits", () => {
  const x = gaussian(4096 * 32, 2);
  const searched = normalisedMse(new TurboQuantCodec({ headDim: 32, bits: 4 }), x);
  const corrected = normalisedMse(new TurboQuantCodec({ headDim: 32, bits: 4, scaleSearch: 1 }), x);
  assert.ok(searched <= 0.0062, `scale search: ${searched}`);
  assert.ok(corrected > 0.0078 && corrected < 0.0086, `norm correction: ${corrected}`);
});

Deno.test("8-bit codes are nearly lossless", () => {
  const x = gaussian(512 * 128, 3);
  const mse = normalisedMse(new TurboQuantCodec({ headDim: 128, bits: 8 }), x);
  assert.ok(mse < 1e-4, `${mse}`);
});

Deno.test("pack/unpack is exact for every code at bits 1-8", () => {
  for (const d of [32, 48, 80, 96, 160, 192]) {
    for (let bits = 1; bits <= 8; bits++) {
      const levels = 1 << bits;
      const codes = Uint8Array.from({ length: d }, (_, i) => (i * 7 + bits) % levels);
      codes[0] = levels - 1; // the all-ones code, across word boundaries below too
      codes[d - 1] = levels - 1;
      const words = new Uint32Array(1 + wordsFor(d, bits) + 1).fill(0xdeadbeef);
      packCodes(codes, bits, words, 1);
      assert.equal(words[0], 0xdeadbeef);
      assert.equal(words[words.length - 1], 0xdeadbeef);
      assert.deepEqual(unpackCodes(words, 1, d, bits), codes);
      // Every code value at every position class.
      for (let v = 0; v < levels; v++) {
        const all = new Uint8Array(d).fill(v);
        const w = new Uint32Array(wordsFor(d, bits));
        packCodes(all, bits, w, 0);
        assert.deepEqual(unpackCodes(w, 0, d, bits), all);
      }
    }
  }
});

Deno.test("codec round trip works for every headDim and bit width", () => {
  for (const headDim of [8, 48, 64, 80, 96, 128, 160, 192, 256]) {
    for (const bits of [1, 3, 8]) {
      const codec = new TurboQuantCodec({ headDim, bits });
      const x = gaussian(headDim * 16, headDim + bits);
      const e = codec.encode(x);
      assert.equal(e.indices.length, 16 * Math.ceil((headDim * bits) / 32));
      assert.equal(e.scales.length, (16 * headDim) / codec.blockSize);
      const mse = normalisedMse(codec, x);
      assert.ok(
        mse < [0, 0.5, 0.2, 0.06, 0, 0, 0, 0, 1e-4][bits],
        `d ${headDim} b ${bits}: ${mse}`,
      );
    }
  }
  assert.equal(new TurboQuantCodec({ headDim: 128, bits: 3 }).bitsPerValue, 3.5);
  assert.equal(new TurboQuantCodec({ headDim: 48, bits: 3 }).blockSize, 16);
});

Deno.test("prod mode gives unbiased inner products with bounded variance", () => {
  const d = 128;
  const rng = new SplitMix32(7);
  for (const rho of [0.5, 0.8, 0.95]) {
    const errs: number[] = [];
    let bound = 0;
    for (let seed = 0; seed < 2000; seed++) {
      const codec = new TurboQuantCodec({ headDim: d, bits: 3, mode: "prod", seed });
      const q = new Float32Array(d);
      const k = new Float32Array(d);
      for (let i = 0; i < d; i++) {
        const a = rng.nextGaussian();
        q[i] = a;
        k[i] = rho * a + Math.sqrt(1 - rho * rho) * rng.nextGaussian();
      }
      let exact = 0, qq = 0, kk = 0;
      for (let i = 0; i < d; i++) exact += q[i] * k[i], qq += q[i] * q[i], kk += k[i] * k[i];
      errs.push(codec.dot(q, codec.encode(k))[0] - exact);
      bound += (0.18 / d) * qq * kk;
    }
    const n = errs.length;
    const mean = errs.reduce((a, b) => a + b, 0) / n;
    const variance = errs.reduce((a, b) => a + (b - mean) ** 2, 0) / (n - 1);
    assert.ok(Math.abs(mean) < 3 * Math.sqrt(variance / n), `rho ${rho}: mean ${mean}`);
    assert.ok(variance < bound / n, `rho ${rho}: variance ${variance} vs ${bound / n}`);
  }
});

Deno.test("dot equals the inner product with the decoded vectors (mse mode)", () => {
  const codec = new TurboQuantCodec({ headDim: 64, bits: 4 });
  const x = gaussian(64 * 20, 11);
  const q = gaussian(64, 12);
  const e = codec.encode(x);
  const y = codec.decode(e);
  const got = codec.dot(q, e);
  for (let v = 0; v < 20; v++) {
    let want = 0;
    for (let i = 0; i < 64; i++) want += q[i] * y[v * 64 + i];
    assert.ok(Math.abs(got[v] - want) < 1e-4 * (1 + Math.abs(want)), `${got[v]} vs ${want}`);
  }
});

Deno.test("zeros and large outliers stay finite", () => {
  const codec = new TurboQuantCodec({ headDim: 64, bits: 3 });
  const zeros = codec.decode(codec.encode(new Float32Array(128)));
  assert.ok(zeros.every((v) => v === 0));
  const x = gaussian(64, 5);
  x[10] = 1e4;
  const y = codec.decode(codec.encode(x));
  assert.ok(y.every(Number.isFinite));
  // Blocks without the outlier are decoded as well as usual.
  const block = codec.blockSize;
  let err = 0, norm = 0;
  for (let i = 0; i < 64; i++) {
    if (Math.floor(i / block) === Math.floor(10 / block)) continue;
    err += (x[i] - y[i]) ** 2;
    norm += x[i] ** 2;
  }
  assert.ok(err / norm < 0.06, `${err / norm}`);
  assert.ok(Math.abs(y[10] - 1e4) < 0.05 * 1e4);
  for (const mode of ["mse", "prod"] as const) {
    const c = new TurboQuantCodec({ headDim: 32, bits: 3, mode });
    assert.ok(c.decode(c.encode(new Float32Array(32))).every((v) => v === 0));
  }
});

Deno.test("the same seed gives the same bytes, another seed other bytes", () => {
  const x = gaussian(128 * 8, 9);
  const bytes = (o: CodecOptions) => {
    const e = new TurboQuantCodec(o).encode(x);
    return [e.indices, e.scales, e.signs];
  };
  const o: CodecOptions = { headDim: 128, bits: 4, mode: "prod", seed: 42 };
  assert.deepEqual(bytes(o), bytes({ ...o }));
  assert.notDeepEqual(bytes(o)[0], bytes({ ...o, seed: 43 })[0]);
});

Deno.test("bad input throws TurboQuantError naming argument and value", () => {
  const bad = (f: () => unknown, pattern: RegExp) =>
    assert.throws(f, (e: unknown) => e instanceof TurboQuantError && pattern.test(e.message));
  bad(() => new TurboQuantCodec({ headDim: 60, bits: 3 }), /headDim: 60/);
  bad(() => new TurboQuantCodec({ headDim: 64, bits: 9 }), /bits: 9/);
  bad(() => new TurboQuantCodec({ headDim: 64, bits: 0 }), /bits: 0/);
  bad(() => new TurboQuantCodec({ headDim: 64, bits: 1, mode: "prod" }), /bits: 1/);
  bad(() => new TurboQuantCodec({ headDim: 64, bits: 3, blockSize: 24 }), /blockSize: 24/);
  bad(() => new TurboQuantCodec({ headDim: 64, bits: 3, blockSize: 128 }), /blockSize: 128/);
  bad(() => new TurboQuantCodec({ headDim: 64, bits: 3, scaleSearch: 0 }), /scaleSearch: 0/);
  bad(() => new TurboQuantCodec({ headDim: 64, bits: 3, seed: -1 }), /seed: -1/);
  const codec = new TurboQuantCodec({ headDim: 64, bits: 3 });
  bad(() => codec.encode(new Float32Array(100)), /x: length 100/);
  const x = new Float32Array(64 * 3);
  x[64 * 2 + 5] = NaN;
  bad(() => codec.encode(x), /x: value NaN of vector 2 \(coordinate 5\)/);
  x[64 * 2 + 5] = Infinity;
  bad(() => codec.encode(x), /Infinity of vector 2/);
  x[64 * 2 + 5] = 1e6;
  bad(() => codec.encode(x), /norm 999999/);
  const e = codec.encode(new Float32Array(64));
  bad(() => codec.decode({ ...e, count: 2 }), /e.indices/);
  bad(() => codec.dot(new Float32Array(10), e), /query/);
});
