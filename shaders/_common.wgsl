// Shared helpers, concatenated by the host in front of every kernel (after the kernel's
// compile-time constants). Names start with tq_ so kernels cannot collide with them.

// Finite stand-in for -infinity: WGSL has no infinity literal, and exp(TQ_NEG - TQ_NEG) = 1
// keeps merges of empty partials NaN-free.
const TQ_NEG: f32 = -1e30;

// Workgroup index of a dispatch folded into x and y (x is capped at 65535 workgroups).
fn tq_group_index(wg: vec3<u32>, groups_x: u32) -> u32 {
  return wg.y * groups_x + wg.x;
}

// Low and high four of the eight f16 values packed in a vec4<u32>.
fn tq_unpack8_lo(w: vec4<u32>) -> vec4<f32> {
  return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}

fn tq_unpack8_hi(w: vec4<u32>) -> vec4<f32> {
  return vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w));
}

// Four f32 values as two u32 words of f16 (round to nearest even).
fn tq_pack4(x: vec4<f32>) -> vec2<u32> {
  return vec2<u32>(pack2x16float(x.xy), pack2x16float(x.zw));
}

// Four f16 values from two u32 words.
fn tq_unpack4(w: vec2<u32>) -> vec4<f32> {
  return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}
