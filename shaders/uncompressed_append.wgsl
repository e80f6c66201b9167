// Append to an uncompressed cache: source K/V f32 [kv_heads, tokens, HD] -> storage
// token-major [token][kv_head][HD] as f32 or f16 (F16). One invocation per four values.
// Prepended by the host: HD (head dim, multiple of 8), F16 (storage dtype).

const HD4: u32 = HD / 4u;
// u32 words per head row in storage
const SW: u32 = select(HD, HD / 2u, F16);

struct Params {
  tokens: u32,     // tokens of this append piece
  kv_heads: u32,
  token0: u32,     // first destination token, relative to the bound storage window
  groups_x: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> src_k: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> src_v: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> dst_k: array<u32>;
@group(0) @binding(4) var<storage, read_write> dst_v: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let i = tq_group_index(wg, P.groups_x) * 64u + lane;
  if (i >= P.tokens * P.kv_heads * HD4) {
    return;
  }
  // Destination order (token, head, column) so that writes are contiguous.
  let c = i % HD4;
  let th = i / HD4;
  let h = th % P.kv_heads;
  let t = th / P.kv_heads;
  let s = (h * P.tokens + t) * HD4 + c;
  let kx = src_k[s];
  let vx = src_v[s];
  let row = ((P.token0 + t) * P.kv_heads + h) * SW;
  if (F16) {
    let kw = tq_pack4(kx);
    let vw = tq_pack4(vx);
    dst_k[row + 2u * c] = kw.x;
    dst_k[row + 2u * c + 1u] = kw.y;
    dst_v[row + 2u * c] = vw.x;
    dst_v[row + 2u * c + 1u] = vw.y;
  } else {
    let kw = bitcast<vec4<u32>>(kx);
    let vw = bitcast<vec4<u32>>(vx);
    for (var j = 0u; j < 4u; j++) {
      dst_k[row + 4u * c + j] = kw[j];
      dst_v[row + 4u * c + j] = vw[j];
    }
  }
}
