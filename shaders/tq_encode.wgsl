// TurboQuant encode, pass 1: one invocation per (token, head, block). Centres (keys), flips
// signs, rotates, searches the block's scale and writes one code per value (u32) and the f16
// scale; pass 2 (tq_pack.wgsl) packs them densely. Needs _tq_common.wgsl and the constants
// HEAD_DIM, BLOCK, NUM_BLOCKS, CODE_BITS, LEVELS, SEARCH, NORM_CORRECTION, FWHT_SCALE.

struct Params {
  tokens: u32, // tokens in this append
  heads: u32,
  center: u32, // 1: subtract the key mean first
  width: u32, // invocations per row of the 2D dispatch
}

@group(0) @binding(0) var<uniform> params: Params;
// Input, [heads][tokens][HEAD_DIM] as the public API takes it.
@group(0) @binding(1) var<storage, read> src: array<f32>;
// signs[HEAD_DIM], boundaries[LEVELS - 1], centroids[LEVELS], factors[SEARCH].
@group(0) @binding(2) var<storage, read> tables: array<f32>;
@group(0) @binding(3) var<storage, read> key_mean: array<f32>; // [heads][HEAD_DIM]
@group(0) @binding(4) var<storage, read_write> codes: array<u32>; // [token][head][HEAD_DIM]
@group(0) @binding(5) var<storage, read_write> scales: array<u32>; // [token][head][NUM_BLOCKS]
// Rotated-domain residual y - s * c, [token][head][HEAD_DIM] (read by the prod-mode sketch).
@group(0) @binding(6) var<storage, read_write> residual: array<f32>;

const BOUNDARIES: u32 = HEAD_DIM;
const CENTROIDS: u32 = HEAD_DIM + LEVELS - 1u;
const FACTORS: u32 = HEAD_DIM + 2u * LEVELS - 1u;

var<workgroup> boundary: array<f32, LEVELS>;
var<workgroup> centroid: array<f32, LEVELS>;

// Number of boundaries below v / s: a descent of CODE_BITS steps over thresholds s * b (f32
// products, as on the CPU), written out so that no loop counter is involved.
fn quantize(v: f32, s: f32) -> u32 {
  var code = 0u;
  var step = LEVELS >> 1u;
  if (step > 0u) { if (v > s * boundary[code + step - 1u]) { code += step; } step >>= 1u; }
  if (step > 0u) { if (v > s * boundary[code + step - 1u]) { code += step; } step >>= 1u; }
  if (step > 0u) { if (v > s * boundary[code + step - 1u]) { code += step; } step >>= 1u; }
  if (step > 0u) { if (v > s * boundary[code + step - 1u]) { code += step; } step >>= 1u; }
  if (step > 0u) { if (v > s * boundary[code + step - 1u]) { code += step; } step >>= 1u; }
  if (step > 0u) { if (v > s * boundary[code + step - 1u]) { code += step; } step >>= 1u; }
  if (step > 0u) { if (v > s * boundary[code + step - 1u]) { code += step; } step >>= 1u; }
  if (step > 0u) { if (v > s * boundary[code + step - 1u]) { code += step; } }
  return code;
}

@compute @workgroup_size(64)
fn main(
  @builtin(global_invocation_id) gid: vec3<u32>,
  @builtin(local_invocation_index) lid: u32,
) {
  for (var i = lid; i < LEVELS; i += 64u) {
    centroid[i] = tables[CENTROIDS + i];
    boundary[i] = select(0.0, tables[BOUNDARIES + i], i + 1u < LEVELS);
  }
  workgroupBarrier();

  let g = linear_index(gid, params.width);
  if (g >= params.tokens * params.heads * NUM_BLOCKS) {
    return;
  }
  let blk = g % NUM_BLOCKS;
  let vec = g / NUM_BLOCKS; // token * heads + head
  let head = vec % params.heads;
  let token = vec / params.heads;
  let first = blk * BLOCK;
  let src_base = (head * params.tokens + token) * HEAD_DIM + first;

  var y: array<f32, BLOCK>;
  for (var i = 0u; i < BLOCK; i++) {
    var x = src[src_base + i];
    if (params.center == 1u) {
      x = x - key_mean[head * HEAD_DIM + first + i];
    }
    y[i] = x * tables[first + i];
  }
  fwht_block(&y);
  var ss = 0.0;
  for (var i = 0u; i < BLOCK; i++) {
    ss = ss + y[i] * y[i];
  }
  let norm = sqrt(ss);

  var best: array<u32, BLOCK>;
  var best_scale = 0u;
  if (SEARCH == 1u) {
    var cc = 0.0;
    for (var i = 0u; i < BLOCK; i++) {
      let c = quantize(y[i], norm);
      best[i] = c;
      cc = cc + centroid[c] * centroid[c];
    }
    var s = norm;
    if (NORM_CORRECTION && norm > 0.0) {
      s = norm / sqrt(cc);
    }
    best_scale = f16_bits(s);
  } else {
    var best_err = 3.4028234663852886e38;
    var codes_j: array<u32, BLOCK>;
    for (var j = 0u; j < SEARCH; j++) {
      let candidate = norm * tables[FACTORS + j];
      var dot = 0.0;
      var cc = 0.0;
      for (var i = 0u; i < BLOCK; i++) {
        let c = quantize(y[i], candidate);
        codes_j[i] = c;
        let ci = centroid[c];
        dot = dot + y[i] * ci;
        cc = cc + ci * ci;
      }
      let s16 = f16_bits(dot / cc);
      let s = f16_value(s16);
      var err = 0.0;
      for (var i = 0u; i < BLOCK; i++) {
        let r = y[i] - s * centroid[codes_j[i]];
        err = err + r * r;
      }
      if (err < best_err) {
        best_err = err;
        best_scale = s16;
        best = codes_j;
      }
    }
  }

  let s = f16_value(best_scale);
  let out = vec * HEAD_DIM + first;
  for (var i = 0u; i < BLOCK; i++) {
    codes[out + i] = best[i];
    residual[out + i] = y[i] - s * centroid[best[i]];
  }
  scales[g] = best_scale;
}
