// TurboQuant prod mode: the 1-bit QJL sketch of the rotated-domain residual r (from pass 1):
// sign bit m of a vector is set when (S r)_m >= 0, S the HEAD_DIM x HEAD_DIM Gaussian matrix;
// plus the residual's f16 norm. One invocation per output word: first the sign words of every
// token ([token][head][SIGN_WORDS]), then the norm words ([token][head] f16, two per word).
// Needs _tq_common.wgsl and HEAD_DIM, SIGN_WORDS.

struct Params {
  tokens: u32,
  heads: u32,
  sign_dst: u32, // word offset of the first token's row inside the bound sign range
  norm_dst: u32, // the same for the norm rows
  width: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> residual: array<f32>; // [token][head][HEAD_DIM]
@group(0) @binding(2) var<storage, read> qjl: array<f32>; // S, row-major
@group(0) @binding(3) var<storage, read_write> sign_rows: array<u32>;
@group(0) @binding(4) var<storage, read_write> norm_rows: array<u32>;

fn residual_norm_bits(vec: u32) -> u32 {
  var ss = 0.0;
  for (var i = 0u; i < HEAD_DIM; i++) {
    let r = residual[vec * HEAD_DIM + i];
    ss = ss + r * r;
  }
  return f16_bits(sqrt(ss));
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let g = linear_index(gid, params.width);
  let sign_words = params.tokens * params.heads * SIGN_WORDS;
  let norm_words_per_token = (params.heads + 1u) / 2u;
  if (g < sign_words) {
    let vec = g / SIGN_WORDS;
    let first_row = (g % SIGN_WORDS) * 32u;
    var word = 0u;
    for (var m = first_row; m < min(first_row + 32u, HEAD_DIM); m++) {
      var acc = 0.0;
      for (var i = 0u; i < HEAD_DIM; i++) {
        acc = acc + qjl[m * HEAD_DIM + i] * residual[vec * HEAD_DIM + i];
      }
      if (acc >= 0.0) {
        word = word | (1u << (m - first_row));
      }
    }
    sign_rows[params.sign_dst + g] = word;
    return;
  }
  let n = g - sign_words;
  if (n >= params.tokens * norm_words_per_token) {
    return;
  }
  let token = n / norm_words_per_token;
  let head = 2u * (n % norm_words_per_token);
  var word = residual_norm_bits(token * params.heads + head);
  if (head + 1u < params.heads) {
    word = word | (residual_norm_bits(token * params.heads + head + 1u) << 16u);
  }
  norm_rows[params.norm_dst + n] = word;
}
