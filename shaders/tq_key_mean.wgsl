// Key centring: the mean key of a layer's first append, per KV head and channel, in f32.
// One workgroup per (head, channel); its invocations stride over the tokens (so no single
// loop runs past Mesa's iteration cap) and a tree reduction adds their partial sums.

struct Params {
  tokens: u32,
  head_dim: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>; // [heads][tokens][head_dim]
@group(0) @binding(2) var<storage, read_write> key_mean: array<f32>; // [heads][head_dim]

var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let head = wid.y;
  let channel = wid.x;
  var acc = 0.0;
  for (var t = lid; t < params.tokens; t += 256u) {
    acc += src[(head * params.tokens + t) * params.head_dim + channel];
  }
  partial[lid] = acc;
  workgroupBarrier();
  for (var stride = 128u; stride > 0u; stride >>= 1u) {
    if (lid < stride) {
      partial[lid] += partial[lid + stride];
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    key_mean[head * params.head_dim + channel] = partial[0] / f32(params.tokens);
  }
}
