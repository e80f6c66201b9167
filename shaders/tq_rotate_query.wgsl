// Fused TurboQuant attention, pass 1 of 3: the queries into the keys' rotated domain, once per
// query row, so that <q, k_t> = <R q, y_t> is scored against the packed codes directly.
// Entry `main`: one invocation per (query row, block): signs, a normalised Hadamard transform of
// the block, times the attention scale. Entry `sketch` (prod key mode): one invocation per
// (row, coordinate m) of the QJL projection sqrt(pi/2) / d * (S R q)_m, written at sq_base.
// Output rows are reordered for the attention kernel: query head h = kv * group + j at query
// token i goes to row (i * group + j) * kv_heads + kv, so the rows one dispatch needs are one
// contiguous range. Needs _tq_common.wgsl and HEAD_DIM, BLOCK, NUM_BLOCKS, FWHT_SCALE, QJL_SCALE.

struct Params {
  rows: u32, // query rows: heads * q_tokens
  groups_x: u32, // workgroups per row of the 2D dispatch
  sq_base: u32, // index of the first projected value in QR
  scale: f32, // attention scale
  group: u32, // query heads per KV head
  kv_heads: u32,
  q_tokens: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
// main: the queries [row][HEAD_DIM] and the key codec's signs; sketch: the QJL matrix.
@group(0) @binding(1) var<storage, read> SRC: array<f32>;
@group(0) @binding(2) var<storage, read> TABLE: array<f32>;
@group(0) @binding(3) var<storage, read_write> QR: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let g = gid.y * P.groups_x * 64u + gid.x;
  if (g >= P.rows * NUM_BLOCKS) {
    return;
  }
  let row = g / NUM_BLOCKS; // = head * q_tokens + q_token, the input order
  let off = (g % NUM_BLOCKS) * BLOCK;
  let first = row * HEAD_DIM + off;
  let head = row / P.q_tokens;
  let qi = row % P.q_tokens;
  let dst = ((qi * P.group + head % P.group) * P.kv_heads + head / P.group) * HEAD_DIM + off;
  var y: array<f32, BLOCK>;
  for (var i = 0u; i < BLOCK; i++) {
    y[i] = SRC[first + i] * TABLE[off + i];
  }
  fwht_block(&y);
  for (var i = 0u; i < BLOCK; i++) {
    QR[dst + i] = y[i] * P.scale;
  }
}

@compute @workgroup_size(64)
fn sketch(@builtin(global_invocation_id) gid: vec3<u32>) {
  let g = gid.y * P.groups_x * 64u + gid.x;
  if (g >= P.rows * HEAD_DIM) {
    return;
  }
  let row = g / HEAD_DIM; // in the output order (sketch reads the rotated rows)
  let mm = g % HEAD_DIM;
  var acc = 0.0;
  for (var i = 0u; i < HEAD_DIM; i++) {
    acc = acc + TABLE[mm * HEAD_DIM + i] * QR[row * HEAD_DIM + i];
  }
  QR[P.sq_base + g] = acc * QJL_SCALE;
}
