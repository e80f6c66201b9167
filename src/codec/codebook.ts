/**
 * Lloyd-Max codebooks for one coordinate of a uniformly random unit vector in R^d, whose
 * density is proportional to (1 - t^2)^((d - 3) / 2) on [-1, 1]. With t = sin(theta) this is
 * cos(theta)^(d - 2) d(theta), smooth for every d >= 2, so it is integrated on a theta grid.
 *
 * @module
 */

/** Centroids (ascending) and the decision boundaries between them, for unit vectors. */
export interface Codebook {
  /** 2^bits centroids, ascending, for a unit vector's coordinate. */
  readonly centroids: Float64Array;
  /** 2^bits - 1 boundaries: midpoints of neighbouring centroids. */
  readonly boundaries: Float64Array;
}

const GRID = 1 << 16;
const cache = new Map<string, Codebook>();

/**
 * The Lloyd-Max codebook of `bits` bits (1..8) for dimension `dim` (>= 2), cached.
 *
 * @example
 * ```ts
 * import { lloydMaxCodebook } from "@turboquant/turboquant";
 * console.log(lloydMaxCodebook(128, 3).centroids); // 8 values, +-0.0216 ... +-0.1884
 * ```
 */
export function lloydMaxCodebook(dim: number, bits: number): Codebook {
  const key = `${dim}/${bits}`;
  let book = cache.get(key);
  if (!book) {
    book = solve(dim, bits);
    cache.set(key, book);
  }
  return book;
}

function solve(dim: number, bits: number): Codebook {
  const levels = 1 << bits;
  // Beyond |theta| = thetaMax the density is below e^-80 of its peak: the grid covers only
  // the part that matters, so large d keeps a fine resolution.
  const thetaMax = Math.min(Math.PI / 2, Math.sqrt(160 / Math.max(dim - 2, 1e-9)));
  const h = (2 * thetaMax) / GRID;
  const theta = new Float64Array(GRID + 1);
  const mass = new Float64Array(GRID + 1); // cumulative integral of the density
  const moment = new Float64Array(GRID + 1); // cumulative integral of t * density
  const cube = new Float64Array(GRID + 1); // cumulative integral of density^(1/3), for the start
  let prevF = 0, prevM = 0, prevC = 0;
  for (let i = 0; i <= GRID; i++) {
    const th = -thetaMax + i * h;
    theta[i] = th;
    const f = Math.exp((dim - 2) * Math.log(Math.max(Math.cos(th), 1e-300)));
    const m = Math.sin(th) * f;
    const c = Math.cbrt(f);
    if (i > 0) {
      mass[i] = mass[i - 1] + 0.5 * h * (f + prevF);
      moment[i] = moment[i - 1] + 0.5 * h * (m + prevM);
      cube[i] = cube[i - 1] + 0.5 * h * (c + prevC);
    }
    prevF = f, prevM = m, prevC = c;
  }
  const at = (table: Float64Array, t: number): number => {
    const th = Math.asin(Math.max(-1, Math.min(1, t)));
    const u = (th + thetaMax) / h;
    if (u <= 0) return table[0];
    if (u >= GRID) return table[GRID];
    const i = Math.floor(u);
    return table[i] + (u - i) * (table[i + 1] - table[i]);
  };

  // Start from the companding law (levels spread like density^(1/3)), which is already
  // close to optimal for fine quantizers, then run Lloyd's iteration to convergence.
  const centroids = new Float64Array(levels);
  const totalCube = cube[GRID];
  for (let k = 0, i = 0; k < levels; k++) {
    const target = ((k + 0.5) / levels) * totalCube;
    while (i < GRID && cube[i + 1] < target) i++;
    const frac = (target - cube[i]) / Math.max(cube[i + 1] - cube[i], 1e-300);
    centroids[k] = Math.sin(theta[i] + frac * h);
  }
  const boundaries = new Float64Array(levels - 1);
  // Relative to the spread 1/sqrt(d): far below anything f32 codes can resolve.
  const tolerance = 1e-9 / Math.sqrt(dim);
  // Fine codebooks (7-8 bits) converge slowly; by 4000 steps from the companding start the
  // remaining change no longer moves the MSE.
  for (let iter = 0; iter < 4000; iter++) {
    for (let k = 0; k < levels - 1; k++) boundaries[k] = 0.5 * (centroids[k] + centroids[k + 1]);
    let change = 0;
    let loM = mass[0], loMo = moment[0];
    for (let k = 0; k < levels; k++) {
      const hiM = k < levels - 1 ? at(mass, boundaries[k]) : mass[GRID];
      const hiMo = k < levels - 1 ? at(moment, boundaries[k]) : moment[GRID];
      const w = hiM - loM;
      if (w > 0) {
        const c = (hiMo - loMo) / w;
        change = Math.max(change, Math.abs(c - centroids[k]));
        centroids[k] = c;
      }
      loM = hiM, loMo = hiMo;
    }
    if (change < tolerance) break;
  }
  // Rounding in the cumulative sums breaks the symmetry by ~1e-9 at most: restore it exactly,
  // so that a zero coordinate sits on a boundary and mirrored inputs get mirrored codes.
  for (let k = 0; k < levels / 2; k++) {
    const c = 0.5 * (centroids[levels - 1 - k] - centroids[k]);
    centroids[k] = -c;
    centroids[levels - 1 - k] = c;
  }
  for (let k = 0; k < levels - 1; k++) boundaries[k] = 0.5 * (centroids[k] + centroids[k + 1]);
  return { centroids, boundaries };
}
