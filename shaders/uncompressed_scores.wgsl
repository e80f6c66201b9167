// Split-K attention over an uncompressed (f32 or f16) cache, pass 1 of 2: scores.
//
// One workgroup = one KV head x one block of QB query rows x one chunk of tokens. A query row
// is (query token, query head of the KV head's group), so in decode one workgroup serves every
// query head of a GQA group and each K row is read once for all of them. Each lane takes whole
// tokens and keeps the QB query rows in registers: on software adapters every storage load in
// a loop costs a per-lane scalar loop while registers are nearly free. Private arrays are only
// indexed by constants (//#unroll and //#if blocks are expanded by the host): one
// loop-variable index would move the whole array to memory. There is no barrier (and no
// workgroup memory): llvmpipe compiles barriers into coroutines, and LLVM's coroutine frames
// with many live registers took minutes to compile on the OpenGL path.
//
// Writes the masked scores S[kv_head][row][token of the window] and each lane's maximum
// LM[kv_head][row][chunk slot][lane]; uncompressed_values.wgsl does the rest. Loops are bounded
// by the chunk size, never by the cache length (Mesa stops a shader after 65,535 loop
// iterations per invocation).
//
// Prepended by the host: HD (head dim, multiple of 8), HD4 = HD / 4, QB (rows per workgroup),
// WG (invocations), KW (vec4<u32> K words per head row: HD / 4 for f32, HD / 8 for f16), F16.

struct Params {
  window_tokens: u32,  // valid tokens in the bound storage window
  window_start: u32,   // absolute position of the window's first token
  chunk_tokens: u32,   // tokens per chunk
  slot_base: u32,      // chunk slot of this window's first chunk
  num_slots: u32,      // chunk slots per row (all windows)
  s_stride: u32,       // tokens per row in S (the window size)
  kv_heads: u32,
  group: u32,          // query heads per KV head
  q_tokens: u32,
  row_base: u32,       // first row of this row batch
  rows: u32,           // rows in this row batch (per KV head)
  seq_len: u32,
  causal: u32,
  scale: f32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> K: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> Q: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> S: array<f32>;
@group(0) @binding(4) var<storage, read_write> LM: array<f32>;

// Registers: query rows (pre-scaled), visible positions and running maxima per row.
var<private> q: array<vec4<f32>, QB * HD4>;
var<private> lim: array<u32, QB>;
var<private> mx: array<f32, QB>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let chunk = wg.x;
  let row0 = wg.y * QB;
  let kvh = wg.z;
  let c0 = chunk * P.chunk_tokens;
  let ct = min(P.chunk_tokens, P.window_tokens - c0);
  let pos0 = P.window_start + c0;

  // Positions each row may see (rows past the batch: none) and its query.
  var end = 0u;
  //#unroll r QB
  {
    let g = P.row_base + row0 + {r};
    let ok = row0 + {r} < P.rows;
    let causal_lim = P.seq_len - P.q_tokens + g / P.group + 1u;
    let l = select(0u, select(P.seq_len, causal_lim, P.causal != 0u), ok);
    lim[{r}] = l;
    if (l > pos0) {
      end = max(end, min(ct, l - pos0));
    }
    let qa = select(0u, ((kvh * P.group + g % P.group) * P.q_tokens + g / P.group) * HD4, ok);
    let qs = select(0.0, P.scale, ok);
    //#unroll w HD4
    q[{r} * HD4 + {w}] = Q[qa + {w}] * qs;
    //#end
    mx[{r}] = TQ_NEG;
  }
  //#end

  let kstride = P.kv_heads * KW;
  for (var t = lane; t < end; t += WG) {
    let kb = (c0 + t) * kstride + kvh * KW;
    // Explicit initialisers: naga zeroes an uninitialised var only once, not per iteration.
    var s = array<f32, QB>();
    //#unroll w KW
    {
      let kw = K[kb + {w}];
      //#if F16
      let k0 = tq_unpack8_lo(kw);
      let k1 = tq_unpack8_hi(kw);
      //#unroll r QB
      s[{r}] += dot(q[{r} * HD4 + 2u * {w}], k0) + dot(q[{r} * HD4 + 2u * {w} + 1u], k1);
      //#end
      //#else
      let k = bitcast<vec4<f32>>(kw);
      //#unroll r QB
      s[{r}] += dot(q[{r} * HD4 + {w}], k);
      //#end
      //#end
    }
    //#end
    //#unroll r QB
    if (row0 + {r} < P.rows) {
      let v = select(TQ_NEG, s[{r}], pos0 + t < lim[{r}]);
      S[(kvh * P.rows + row0 + {r}) * P.s_stride + c0 + t] = v;
      mx[{r}] = max(mx[{r}], v);
    }
    //#end
  }
  //#unroll r QB
  if (row0 + {r} < P.rows) {
    LM[((kvh * P.rows + row0 + {r}) * P.num_slots + P.slot_base + chunk) * WG + lane] = mx[{r}];
  }
  //#end
}
