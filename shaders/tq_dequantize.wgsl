// TurboQuant decode of cache rows back to f32, for engines that bring their own attention:
// one invocation per (token, head, block): unpack the codes, times the f16 scale, inverse
// Hadamard transform, signs, plus the key mean (when centred). Output [heads][seq_len][HEAD_DIM].
// Needs _tq_common.wgsl and HEAD_DIM, BLOCK, NUM_BLOCKS, CODE_BITS, LEVELS, WORDS, FWHT_SCALE.

struct Params {
  tokens: u32, // tokens decoded by this dispatch
  heads: u32,
  first_token: u32, // position of its first token in the output
  seq_len: u32, // tokens of the whole output
  index_src: u32, // word offset of the first token's row inside the bound index range
  scale_src: u32, // the same for the scale rows
  center: u32,
  width: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> index_rows: array<u32>;
@group(0) @binding(2) var<storage, read> scale_rows: array<u32>;
// signs[HEAD_DIM], boundaries[LEVELS - 1], centroids[LEVELS], ...
@group(0) @binding(3) var<storage, read> tables: array<f32>;
@group(0) @binding(4) var<storage, read> key_mean: array<f32>;
@group(0) @binding(5) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let g = linear_index(gid, params.width);
  if (g >= params.tokens * params.heads * NUM_BLOCKS) {
    return;
  }
  let blk = g % NUM_BLOCKS;
  let vec = g / NUM_BLOCKS;
  let head = vec % params.heads;
  let token = vec / params.heads;
  let first = blk * BLOCK;
  let row = params.index_src + vec * WORDS;
  let per_token = params.heads * NUM_BLOCKS;
  let k = head * NUM_BLOCKS + blk; // f16 index inside the token's scale row
  let scale_word = scale_rows[params.scale_src + token * ((per_token + 1u) / 2u) + k / 2u];
  let s = f16_value((scale_word >> (16u * (k % 2u))) & 0xffffu);

  var y: array<f32, BLOCK>;
  for (var i = 0u; i < BLOCK; i++) {
    let bit = (first + i) * CODE_BITS;
    let w = bit >> 5u;
    let lo = index_rows[row + w];
    var hi = 0u;
    if ((bit & 31u) + CODE_BITS > 32u) {
      hi = index_rows[row + w + 1u];
    }
    y[i] = s * tables[HEAD_DIM + LEVELS - 1u + code_at(lo, hi, bit & 31u)];
  }
  fwht_block(&y);
  let out = (head * params.seq_len + params.first_token + token) * HEAD_DIM + first;
  for (var i = 0u; i < BLOCK; i++) {
    var x = y[i] * tables[first + i];
    if (params.center == 1u) {
      x = x + key_mean[head * HEAD_DIM + first + i];
    }
    dst[out + i] = x;
  }
}
