// Read back an uncompressed cache: storage token-major [token][kv_head][HD] (f32 or f16)
// -> f32 [kv_heads, tokens, HD]. One invocation per four values.
// Prepended by the host: HD (head dim, multiple of 8), F16 (storage dtype).

const HD4: u32 = HD / 4u;
const SW: u32 = select(HD, HD / 2u, F16);

struct Params {
  tokens: u32,     // tokens to read
  kv_heads: u32,
  token0: u32,     // first source token, relative to the bound storage window
  groups_x: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> src_k: array<u32>;
@group(0) @binding(2) var<storage, read> src_v: array<u32>;
@group(0) @binding(3) var<storage, read_write> out_k: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> out_v: array<vec4<f32>>;

fn load4(f16: bool, row: u32, c: u32, is_k: bool) -> vec4<f32> {
  if (f16) {
    if (is_k) {
      return tq_unpack4(vec2<u32>(src_k[row + 2u * c], src_k[row + 2u * c + 1u]));
    }
    return tq_unpack4(vec2<u32>(src_v[row + 2u * c], src_v[row + 2u * c + 1u]));
  }
  let b = row + 4u * c;
  if (is_k) {
    return bitcast<vec4<f32>>(vec4<u32>(src_k[b], src_k[b + 1u], src_k[b + 2u], src_k[b + 3u]));
  }
  return bitcast<vec4<f32>>(vec4<u32>(src_v[b], src_v[b + 1u], src_v[b + 2u], src_v[b + 3u]));
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let i = tq_group_index(wg, P.groups_x) * 64u + lane;
  if (i >= P.tokens * P.kv_heads * HD4) {
    return;
  }
  // Source order (token, head, column): reads are contiguous.
  let c = i % HD4;
  let th = i / HD4;
  let h = th % P.kv_heads;
  let t = th / P.kv_heads;
  let row = ((P.token0 + t) * P.kv_heads + h) * SW;
  let o = (h * P.tokens + t) * HD4 + c;
  out_k[o] = load4(F16, row, c, true);
  out_v[o] = load4(F16, row, c, false);
}
