/**
 * Test helpers: seeded random data, tolerance asserts, and `gpuTest`, which shares one device
 * per test file, wraps each test in error scopes and destroys what the test registered.
 *
 * @module
 */

import { AssertionError } from "node:assert/strict";
import { requestTurboQuantDevice } from "../src/gpu/device.ts";

/** mulberry32: a small, fast, seeded 32-bit PRNG; returns floats in [0, 1). */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A seeded source of uniform and gaussian values. */
export class Rng {
  readonly #next: () => number;
  #spare: number | null = null;

  constructor(seed: number) {
    this.#next = mulberry32(seed);
  }

  /** Uniform in [0, 1). */
  uniform(): number {
    return this.#next();
  }

  /** Integer in [lo, hi]. */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.#next() * (hi - lo + 1));
  }

  /** Standard normal (Box-Muller, caching the second value). */
  gaussian(): number {
    if (this.#spare !== null) {
      const s = this.#spare;
      this.#spare = null;
      return s;
    }
    let u = this.#next();
    while (u <= 1e-300) u = this.#next();
    const r = Math.sqrt(-2 * Math.log(u));
    const th = 2 * Math.PI * this.#next();
    this.#spare = r * Math.sin(th);
    return r * Math.cos(th);
  }

  /** `n` gaussians times `scale`. */
  gaussians(n: number, scale = 1): Float32Array {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = this.gaussian() * scale;
    return out;
  }

  /** `n` uniforms in [-scale, scale) (cheaper than gaussians for big inputs). */
  uniforms(n: number, scale = 1): Float32Array {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = (2 * this.#next() - 1) * scale;
    return out;
  }
}

/** Rounds every value to f16 (nearest even), as f16 storage does. */
export function f16Rounded(x: Float32Array): Float32Array {
  return Float32Array.from(new Float16Array(x));
}

/** Options of {@linkcode assertClose}. */
export interface CloseOptions {
  /** Relative tolerance per element (default 1e-5). */
  rel?: number;
  /** Absolute tolerance per element (default 1e-6). */
  abs?: number;
  /** Prefix of the failure message. */
  message?: string;
}

/**
 * Asserts |actual[i] - expected[i]| <= abs + rel * |expected[i]| for every i; the failure
 * names the worst index.
 */
export function assertClose(
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  options: CloseOptions = {},
): void {
  const rel = options.rel ?? 1e-5;
  const abs = options.abs ?? 1e-6;
  const prefix = options.message ? `${options.message}: ` : "";
  if (actual.length !== expected.length) {
    throw new AssertionError({
      message: `${prefix}length ${actual.length} != expected ${expected.length}`,
    });
  }
  let worst = -1;
  let worstExcess = 0;
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i];
    const e = expected[i];
    const err = Math.abs(a - e);
    const excess = err / (abs + rel * Math.abs(e));
    if (!(excess <= 1) && (worst < 0 || !(excess <= worstExcess))) {
      worst = i;
      worstExcess = excess;
      if (Number.isNaN(excess)) break;
    }
  }
  if (worst >= 0) {
    throw new AssertionError({
      message: `${prefix}worst at index ${worst}: ${actual[worst]} vs expected ${
        expected[worst]
      } (|diff| ${Math.abs(actual[worst] - expected[worst])}, allowed ${
        abs + rel * Math.abs(expected[worst])
      })`,
    });
  }
}

/** Asserts equal lengths and bitwise-equal values (fast, names the first difference). */
export function assertSameValues(
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  message = "",
): void {
  const prefix = message ? `${message}: ` : "";
  if (actual.length !== expected.length) {
    throw new AssertionError({
      message: `${prefix}length ${actual.length} != expected ${expected.length}`,
    });
  }
  for (let i = 0; i < actual.length; i++) {
    if (!Object.is(actual[i], expected[i])) {
      throw new AssertionError({
        message: `${prefix}first difference at index ${i}: ${actual[i]} vs expected ${expected[i]}`,
      });
    }
  }
}

/** max |a - b| / max |b|: error relative to the output's scale. */
export function relativeError(actual: ArrayLike<number>, expected: ArrayLike<number>): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < expected.length; i++) {
    const d = Math.abs(actual[i] - expected[i]);
    if (!(d <= num)) num = d;
    den = Math.max(den, Math.abs(expected[i]));
  }
  return den === 0 ? num : num / den;
}

/** Asserts relativeError(actual, expected) < tol, naming the worst index. */
export function assertRelativeError(
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  tol: number,
  message = "",
): void {
  const err = relativeError(actual, expected);
  if (!(err < tol)) {
    let worst = 0;
    for (let i = 0; i < expected.length; i++) {
      if (!(Math.abs(actual[i] - expected[i]) <= Math.abs(actual[worst] - expected[worst]))) {
        worst = i;
      }
    }
    throw new AssertionError({
      message: `${
        message ? message + ": " : ""
      }relative error ${err} >= ${tol}; worst index ${worst}: ${actual[worst]} vs ${
        expected[worst]
      }`,
    });
  }
}

/** [heads, tokens, d] -> token range [from, to) of it, same layout. */
export function sliceTokens(
  x: Float32Array,
  heads: number,
  tokens: number,
  d: number,
  from: number,
  to: number,
): Float32Array {
  const n = to - from;
  const out = new Float32Array(heads * n * d);
  for (let h = 0; h < heads; h++) {
    out.set(x.subarray((h * tokens + from) * d, (h * tokens + to) * d), h * n * d);
  }
  return out;
}

/** Concatenates [heads, *, d] arrays along tokens. */
export function concatTokens(parts: Float32Array[], heads: number, d: number): Float32Array {
  const tokens = parts.map((p) => p.length / (heads * d));
  const total = tokens.reduce((a, b) => a + b, 0);
  const out = new Float32Array(heads * total * d);
  let t0 = 0;
  parts.forEach((p, i) => {
    for (let h = 0; h < heads; h++) {
      out.set(p.subarray(h * tokens[i] * d, (h + 1) * tokens[i] * d), (h * total + t0) * d);
    }
    t0 += tokens[i];
  });
  return out;
}

/** What a `gpuTest` body gets. */
export interface GpuTestContext {
  /** The file's shared device. */
  device: GPUDevice;
  /** Registers something to destroy when the test ends; returns it. */
  track<T extends { destroy(): unknown }>(x: T): T;
  /** Deno's test context (for steps). */
  t: Deno.TestContext;
}

const requireGpu = Deno.env.get("TQ_REQUIRE_GPU") === "1";
const hasAdapter = await (async () => {
  try {
    return (await navigator.gpu?.requestAdapter()) != null;
  } catch {
    return false;
  }
})();
const backend = Deno.env.get("DENO_WEBGPU_BACKEND") ?? "default";

let shared: Promise<GPUDevice> | null = null;

/** The file's shared device (created on first use). */
export function sharedDevice(): Promise<GPUDevice> {
  shared ??= requestTurboQuantDevice();
  return shared;
}

/** True where a WebGPU adapter exists. */
export const gpuAvailable: boolean = hasAdapter;

/**
 * A GPU test: runs with the file's shared device inside validation / out-of-memory / internal
 * error scopes (any error fails the test) and destroys what it tracked. Without an adapter it
 * prints a SKIP line and is ignored, unless TQ_REQUIRE_GPU=1, where that is a failure.
 */
export function gpuTest(name: string, fn: (ctx: GpuTestContext) => Promise<void> | void): void {
  if (!hasAdapter && !requireGpu) {
    console.log(`SKIP ${name}: no WebGPU adapter (set TQ_REQUIRE_GPU=1 to fail instead)`);
    Deno.test({ name, ignore: true, fn() {} });
    return;
  }
  Deno.test({
    name,
    // The shared device and pending map callbacks outlive single tests by design.
    sanitizeResources: false,
    sanitizeOps: false,
    async fn(t) {
      if (!hasAdapter) {
        throw new Error(`no WebGPU adapter (backend ${backend}) and TQ_REQUIRE_GPU=1`);
      }
      const device = await sharedDevice();
      const tracked: { destroy(): unknown }[] = [];
      const uncaptured: string[] = [];
      const onError = (e: Event): void => {
        uncaptured.push((e as GPUUncapturedErrorEvent).error.message);
      };
      device.addEventListener("uncapturederror", onError);
      device.pushErrorScope("internal");
      device.pushErrorScope("out-of-memory");
      device.pushErrorScope("validation");
      let failure: unknown = null;
      try {
        await fn({ device, track: (x) => (tracked.push(x), x), t });
      } catch (e) {
        failure = e;
      } finally {
        for (const x of tracked.reverse()) x.destroy();
      }
      const errors = [
        await device.popErrorScope(),
        await device.popErrorScope(),
        await device.popErrorScope(),
      ].filter((e) => e !== null);
      device.removeEventListener("uncapturederror", onError);
      if (failure) throw failure;
      if (errors.length > 0 || uncaptured.length > 0) {
        throw new Error(
          `WebGPU errors during the test: ${
            [...errors.map((e) => e!.message), ...uncaptured].join(" | ")
          }`,
        );
      }
    },
  });
}
