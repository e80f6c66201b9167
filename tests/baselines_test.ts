import assert from "node:assert/strict";
import {
  BASELINES,
  normalisedMse,
  q4_0,
  Q4_0_BITS_PER_VALUE,
  q8_0,
  Q8_0_BITS_PER_VALUE,
  rotateBlocks,
  rotatedQ4_0,
  rotatedQ8_0,
  rotationSigns,
  unrotateBlocks,
} from "../bench/_baselines.ts";

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
  for (let i = 0; i < n; i += 2) {
    const r = Math.sqrt(-2 * Math.log(uniform()));
    const th = 2 * Math.PI * uniform();
    out[i] = r * Math.cos(th);
    if (i + 1 < n) out[i + 1] = r * Math.sin(th);
  }
  return out;
}

Deno.test("baselines: bits per value", () => {
  assert.equal(Q4_0_BITS_PER_VALUE, 4.5);
  assert.equal(Q8_0_BITS_PER_VALUE, 8.5);
  assert.deepEqual(BASELINES.map((b) => [b.name, b.bitsPerValue]), [
    ["q4_0", 4.5],
    ["rot-q4_0", 4.5],
    ["q8_0", 8.5],
    ["rot-q8_0", 8.5],
  ]);
});

Deno.test("baselines: normalised MSE on Gaussian blocks of 32", () => {
  const x = gaussian(32 * 8192, 1);
  const e4 = normalisedMse(x, q4_0(x, 32));
  const e8 = normalisedMse(x, q8_0(x, 32));
  const r4 = normalisedMse(x, rotatedQ4_0(x, 32));
  const r8 = normalisedMse(x, rotatedQ8_0(x, 32));
  assert.ok(e4 > 0.0065 && e4 < 0.0085, `q4_0 ${e4}`);
  assert.ok(r4 > 0.0065 && r4 < 0.0085, `rotated q4_0 ${r4}`);
  // Step absmax / 127 instead of absmax / 8: error about (127 / 8)^2 = 252 times lower.
  assert.ok(e8 < e4 / 100 && e8 > 0, `q8_0 ${e8}`);
  assert.ok(r8 < r4 / 100 && r8 > 0, `rotated q8_0 ${r8}`);
  // Same along rows of 128: blocks are independent.
  const e4r = normalisedMse(x, q4_0(x, 128));
  assert.ok(Math.abs(e4r - e4) < 1e-12, `q4_0 by rows of 128 ${e4r} vs ${e4}`);
});

Deno.test("baselines: q4_0 and q8_0 follow llama.cpp on a hand-made block", () => {
  const x = new Float32Array(32);
  for (let i = 0; i < 32; i++) x[i] = (i - 12) / 4; // max magnitude 19/4 at i = 31
  const y = q4_0(x, 32);
  const d = Math.f16round((19 / 4) / -8);
  // The largest value maps to code 0 (= -8 d), values near zero to code 8 (0).
  assert.equal(y[31], -8 * d);
  assert.ok(y[12] === 0);
  for (let i = 0; i < 32; i++) {
    const q = Math.min(
      15,
      Math.trunc(Math.fround(x[i] * Math.fround(1 / Math.fround(19 / 4 / -8))) + 8.5),
    );
    assert.ok(y[i] === (q - 8) * d, `q4_0 at ${i}: ${y[i]} vs ${(q - 8) * d}`);
  }
  const z = q8_0(x, 32);
  const d8 = Math.f16round(Math.fround(19 / 4 / 127));
  assert.equal(z[31], 127 * d8);
  assert.ok(z[12] === 0);
  // All-zero block: no division by zero.
  assert.ok(q4_0(new Float32Array(64), 32).every((v) => v === 0));
  assert.ok(q8_0(new Float32Array(64), 32).every((v) => v === 0));
});

Deno.test("baselines: block rotation is orthogonal and exactly invertible", () => {
  const x = gaussian(128 * 16, 2);
  const y = rotateBlocks(x, 128);
  // Norm of every block is preserved.
  for (let o = 0; o < x.length; o += 32) {
    let nx = 0, ny = 0;
    for (let j = 0; j < 32; j++) {
      nx += x[o + j] ** 2;
      ny += y[o + j] ** 2;
    }
    assert.ok(Math.abs(nx - ny) < 1e-5 * nx, `block ${o / 32}: ${nx} vs ${ny}`);
  }
  assert.ok(normalisedMse(x, y) > 0.5, "the rotation changes the values");
  const back = unrotateBlocks(y, 128);
  let maxErr = 0;
  for (let i = 0; i < x.length; i++) maxErr = Math.max(maxErr, Math.abs(back[i] - x[i]));
  assert.ok(maxErr < 1e-6, `round trip max error ${maxErr}`);
  // A different seed gives a different rotation, which still inverts.
  const y2 = rotateBlocks(x, 128, 7);
  assert.notDeepEqual(y2, y);
  const back2 = unrotateBlocks(y2, 128, 7);
  for (let i = 0; i < x.length; i++) assert.ok(Math.abs(back2[i] - x[i]) < 1e-6);
  // The signs are fixed per channel: mixed, deterministic.
  const s = rotationSigns(128);
  assert.deepEqual(s, rotationSigns(128));
  const plus = s.filter((v) => v === 1).length;
  assert.ok(plus > 40 && plus < 88, `${plus} of 128 signs are +1`);
});

Deno.test("baselines: rotation spreads an outlier channel", () => {
  // Keys with one large channel: plain q4_0 wastes the block's range on it, the rotated
  // variant does not.
  const x = gaussian(128 * 512, 3);
  for (let r = 0; r < 512; r++) x[r * 128 + 5] += 20;
  const plain = normalisedMse(x, q4_0(x, 128));
  const rot = normalisedMse(x, rotatedQ4_0(x, 128));
  assert.ok(rot < plain, `rotated ${rot} vs plain ${plain}`);
});

Deno.test("baselines: bad shapes are rejected", () => {
  assert.throws(() => q4_0(new Float32Array(48), 48), RangeError);
  assert.throws(() => q8_0(new Float32Array(100), 32), RangeError);
  assert.throws(() => rotateBlocks(new Float32Array(64), 0), RangeError);
});
