// Smoke test kernel: out[i] = a[i] * scale + b[i], one value per invocation.

struct Params {
  n: u32,
  groups_x: u32,
  scale: f32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let i = tq_group_index(wg, P.groups_x) * 64u + lane;
  if (i < P.n) {
    out[i] = a[i] * P.scale + b[i];
  }
}
