/**
 * The demo's metrics: pooled normalised MSE, per-head cosines, mean/min summaries, nearest-
 * neighbour rankings, key centring, and storage per token. All inputs are heads-major
 * `[numHeads, tokens, headDim]` where a shape is involved.
 *
 * @module
 */

/** Accumulates sum ||x - y||^2 and sum ||x||^2 over many arrays (x exact, y approximate). */
export class ErrorAccumulator {
  #err = 0;
  #ref = 0;

  /** Adds one pair of equal-length arrays. */
  add(x: ArrayLike<number>, y: ArrayLike<number>): void {
    if (x.length !== y.length) throw new RangeError(`lengths differ: ${x.length} vs ${y.length}`);
    for (let i = 0; i < x.length; i++) {
      this.#err += (x[i] - y[i]) ** 2;
      this.#ref += x[i] ** 2;
    }
  }

  /** sum ||x - y||^2 / sum ||x||^2 (0 when nothing or only zeros were added). */
  get value(): number {
    return this.#ref === 0 ? 0 : this.#err / this.#ref;
  }
}

/** Cosine similarity of two equal-length vectors (f64 accumulation; 0 if one is zero). */
export function cosine(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new RangeError(`lengths differ: ${a.length} vs ${b.length}`);
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return na === 0 || nb === 0 ? 0 : dot / Math.sqrt(na * nb);
}

/** Cosine of each head's block (`tokens * headDim` values, flattened) of a and b. */
export function headCosines(a: Float32Array, b: Float32Array, numHeads: number): number[] {
  if (a.length !== b.length || a.length % numHeads !== 0) {
    throw new RangeError(`cannot split ${a.length} / ${b.length} values into ${numHeads} heads`);
  }
  const n = a.length / numHeads;
  const out: number[] = [];
  for (let h = 0; h < numHeads; h++) {
    out.push(cosine(a.subarray(h * n, (h + 1) * n), b.subarray(h * n, (h + 1) * n)));
  }
  return out;
}

/** Mean and minimum of some numbers. */
export interface Summary {
  /** Arithmetic mean. */
  mean: number;
  /** Smallest value. */
  min: number;
}

/** Mean and minimum of a non-empty list. */
export function summarize(values: readonly number[]): Summary {
  if (values.length === 0) throw new RangeError("nothing to summarize");
  return { mean: values.reduce((s, v) => s + v, 0) / values.length, min: Math.min(...values) };
}

/** Indices of the other vectors, most similar to vector `i` (by cosine) first. */
export function neighbourOrder(vectors: readonly ArrayLike<number>[], i: number): number[] {
  const others = vectors.map((_, j) => j).filter((j) => j !== i);
  const sim = new Map(others.map((j) => [j, cosine(vectors[i], vectors[j])]));
  return others.sort((a, b) => sim.get(b)! - sim.get(a)! || a - b);
}

/** How nearest-neighbour rankings moved between exact and approximate vectors. */
export interface RankingChange {
  /** Vectors whose ranking of the others is exactly the same. */
  unchanged: number;
  /** Number of vectors compared. */
  total: number;
  /** Largest |exact rank - approximate rank| of any neighbour of any vector. */
  maxDisplacement: number;
  /** Vectors whose nearest neighbour is the same. */
  nearestKept: number;
}

/** Compares every vector's neighbour ranking among `exact` with the one among `approx`. */
export function compareRankings(
  exact: readonly ArrayLike<number>[],
  approx: readonly ArrayLike<number>[],
): RankingChange {
  if (exact.length !== approx.length) {
    throw new RangeError(`${exact.length} exact vectors vs ${approx.length} approximate`);
  }
  let unchanged = 0;
  let maxDisplacement = 0;
  let nearestKept = 0;
  for (let i = 0; i < exact.length; i++) {
    const a = neighbourOrder(exact, i);
    const b = neighbourOrder(approx, i);
    if (a.every((j, r) => b[r] === j)) unchanged++;
    if (a[0] === b[0]) nearestKept++;
    a.forEach((j, r) => (maxDisplacement = Math.max(maxDisplacement, Math.abs(b.indexOf(j) - r))));
  }
  return { unchanged, total: exact.length, maxDisplacement, nearestKept };
}

/** "6/6 rankings unchanged", or "4/6 rankings unchanged, max shift 1, nearest kept 6/6". */
export function formatRankingChange(r: RankingChange): string {
  const head = `${r.unchanged}/${r.total} rankings unchanged`;
  return r.unchanged === r.total
    ? head
    : `${head}, max shift ${r.maxDisplacement}, nearest kept ${r.nearestKept}/${r.total}`;
}

/**
 * Smallest difference between the cosines of two successive neighbours in any vector's
 * ranking: how close the rankings are to ties (a smaller perturbation can swap them).
 */
export function smallestNeighbourGap(vectors: readonly ArrayLike<number>[]): number {
  let gap = Infinity;
  vectors.forEach((v, i) => {
    const sims = neighbourOrder(vectors, i).map((j) => cosine(v, vectors[j]));
    for (let r = 1; r < sims.length; r++) gap = Math.min(gap, sims[r - 1] - sims[r]);
  });
  return gap;
}

/** Per-head, per-channel mean over the tokens: `[numHeads, headDim]` (f64 sums). */
export function meanPerHead(x: Float32Array, numHeads: number, headDim: number): Float32Array {
  const tokens = x.length / (numHeads * headDim);
  if (!Number.isInteger(tokens) || tokens === 0) {
    throw new RangeError(`${x.length} values are not ${numHeads} heads of ${headDim}-d rows`);
  }
  const mean = new Float32Array(numHeads * headDim);
  const acc = new Float64Array(headDim);
  for (let h = 0; h < numHeads; h++) {
    acc.fill(0);
    for (let t = 0; t < tokens; t++) {
      const o = (h * tokens + t) * headDim;
      for (let d = 0; d < headDim; d++) acc[d] += x[o + d];
    }
    for (let d = 0; d < headDim; d++) mean[h * headDim + d] = acc[d] / tokens;
  }
  return mean;
}

/** x plus `sign` times the per-head row `mean` on every token (a new array). */
export function shiftPerHead(
  x: Float32Array,
  mean: Float32Array,
  numHeads: number,
  sign: 1 | -1,
): Float32Array {
  const headDim = mean.length / numHeads;
  const tokens = x.length / (numHeads * headDim);
  const out = new Float32Array(x.length);
  for (let h = 0; h < numHeads; h++) {
    for (let t = 0; t < tokens; t++) {
      const o = (h * tokens + t) * headDim;
      for (let d = 0; d < headDim; d++) out[o + d] = x[o + d] + sign * mean[h * headDim + d];
    }
  }
  return out;
}

/** Stored bytes per token for K and V of all heads of one layer. */
export function kvBytesPerToken(bitsPerValue: number, numHeads: number, headDim: number): number {
  return (2 * numHeads * headDim * bitsPerValue) / 8;
}
