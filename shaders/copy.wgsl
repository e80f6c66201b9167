// Plain copy kernel (the bandwidth roofline of the benchmarks): dst = src, 16 bytes per
// invocation, the dispatch folded into x and y.

struct Params {
  n: u32,        // vec4 words to copy
  groups_x: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let i = tq_group_index(wg, P.groups_x) * 64u + lane;
  if (i < P.n) {
    dst[i] = src[i];
  }
}
