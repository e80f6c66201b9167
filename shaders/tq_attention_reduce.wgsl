// Fused TurboQuant attention, pass 3 of 3: merges the split-K partials of tq_attention.wgsl
// (acc, max, sum per chunk and invocation) into one output row, still in the values' rotated
// domain, then rotates it back (a Hadamard transform per block, then the value signs) and
// writes out[head][q_token][HEAD_DIM].
//
// One workgroup per (KV head, row of the row group). Lane i < HEAD_DIM / 4 merges columns
// 4i .. 4i + 3 over every partial with an online rescale (one loop over them: Mesa's budget of
// 65,535 loop iterations per invocation bounds their number, see MAX_SLOTS); lane
// b < NUM_BLOCKS then transforms block b. Needs _tq_common.wgsl and HEAD_DIM, BLOCK, NUM_BLOCKS, FWHT_SCALE, WG.

const HEAD_DIM4: u32 = HEAD_DIM / 4u;

struct Params {
  num_slots: u32, // partials per row
  rows: u32, // rows of the row group, per KV head
  row_base: u32, // first row of the group (per KV head: q_token * group + head in group)
  group: u32, // query heads per KV head
  q_tokens: u32,
  total: u32, // KV heads * rows: workgroups that do work
  groups_x: u32, // workgroups per row of the 2D dispatch
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> PART: array<vec4<f32>>;
// The value codec's signs [HEAD_DIM].
@group(0) @binding(2) var<storage, read> VSIGNS: array<f32>;
@group(0) @binding(3) var<storage, read_write> OUT: array<f32>;

var<workgroup> o_s: array<f32, HEAD_DIM>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let prow = wg.y * P.groups_x + wg.x;
  if (prow >= P.total) {
    return;
  }
  let kvh = prow / P.rows;
  let g = P.row_base + prow % P.rows;
  let head = kvh * P.group + g % P.group;
  let qi = g / P.group;
  let base = prow * P.num_slots;
  if (lane < HEAD_DIM4) {
    var m = TQ_NEG;
    var l = 0.0;
    var acc = vec4<f32>(0.0);
    for (var s = 0u; s < P.num_slots; s++) {
      let slot = (base + s) * (HEAD_DIM4 + 1u);
      let ml = PART[slot + HEAD_DIM4];
      let nm = max(m, ml.x);
      let a = exp(m - nm);
      let b = exp(ml.x - nm);
      l = l * a + ml.y * b;
      acc = acc * a + PART[slot + lane] * b;
      m = nm;
    }
    let o = select(vec4<f32>(0.0), acc / l, l > 0.0);
    o_s[4u * lane] = o.x;
    o_s[4u * lane + 1u] = o.y;
    o_s[4u * lane + 2u] = o.z;
    o_s[4u * lane + 3u] = o.w;
  }
  workgroupBarrier();
  if (lane < NUM_BLOCKS) {
    var y: array<f32, BLOCK>;
    let first = lane * BLOCK;
    for (var i = 0u; i < BLOCK; i++) {
      y[i] = o_s[first + i];
    }
    fwht_block(&y);
    let out = (head * P.q_tokens + qi) * HEAD_DIM + first;
    for (var i = 0u; i < BLOCK; i++) {
      OUT[out + i] = y[i] * VSIGNS[first + i];
    }
  }
}
