// TurboQuant encode, pass 2: packs the codes and f16 scales of pass 1 into the cache rows.
// One invocation per output word: first the index words of every token ([token][head][word],
// CODE_BITS bits per code, least significant bit first, codes may straddle words), then the
// scale words ([token][head * NUM_BLOCKS] f16 values, two per word). Needs _tq_common.wgsl and
// HEAD_DIM, NUM_BLOCKS, CODE_BITS, LEVELS, WORDS (index words per head).

struct Params {
  tokens: u32,
  heads: u32,
  index_dst: u32, // word offset of the first token's row inside the bound index range
  scale_dst: u32, // the same for the scale rows
  width: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> codes: array<u32>; // [token][head][HEAD_DIM]
@group(0) @binding(2) var<storage, read> scales: array<u32>; // [token][head][NUM_BLOCKS]
@group(0) @binding(3) var<storage, read_write> index_rows: array<u32>;
@group(0) @binding(4) var<storage, read_write> scale_rows: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let g = linear_index(gid, params.width);
  let index_words = params.tokens * params.heads * WORDS;
  let per_token = params.heads * NUM_BLOCKS;
  let scale_words_per_token = (per_token + 1u) / 2u;
  if (g < index_words) {
    let vec = g / WORDS;
    let lo = (g % WORDS) * 32u;
    var word = 0u;
    for (var j = lo / CODE_BITS; j < HEAD_DIM && j * CODE_BITS < lo + 32u; j++) {
      let c = codes[vec * HEAD_DIM + j];
      let bit = j * CODE_BITS;
      if (bit >= lo) {
        word = word | (c << (bit - lo));
      } else {
        word = word | (c >> (lo - bit));
      }
    }
    index_rows[params.index_dst + g] = word;
    return;
  }
  let s = g - index_words;
  if (s >= params.tokens * scale_words_per_token) {
    return;
  }
  let token = s / scale_words_per_token;
  let k = 2u * (s % scale_words_per_token);
  let first = scales[token * per_token + k];
  var second = 0u;
  if (k + 1u < per_token) {
    second = scales[token * per_token + k + 1u];
  }
  scale_rows[params.scale_dst + s] = first | (second << 16u);
}
