// Split-K attention over an uncompressed (f32 or f16) cache, pass 2 of 2: softmax weights
// times V, per chunk, into (acc, max, sum) partial slots that split_k_reduce.wgsl merges.
//
// Same workgroups as uncompressed_scores.wgsl (KV head x QB rows x chunk). The chunk's
// maximum per row comes from pass 1's lane maxima, so p = exp(s - max) is exact for the chunk.
// Lane = (token group gi, column group ci): lane ci holds CV vec4 columns of each row's
// accumulator in registers and reads one score per row and token; each token group writes its
// own partial slot (no barrier, no workgroup memory).
//
// Prepended by the host: HD, HD4 = HD / 4, QB, WG (lanes of pass 1, for its maxima), VL
// (invocations here), CL (column lanes, divides HD4), CV = HD4 / CL, NG = VL / CL, VW (u32 V
// words per head row: HD for f32, HD / 2 for f16), F16.

struct Params {
  window_tokens: u32,
  window_start: u32,
  chunk_tokens: u32,
  slot_base: u32,      // chunk slot of this window's first chunk
  num_slots: u32,      // chunk slots per row (partial slots per row = num_slots * NG)
  s_stride: u32,
  kv_heads: u32,
  group: u32,
  q_tokens: u32,
  row_base: u32,
  rows: u32,
  seq_len: u32,
  causal: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> V: array<u32>;
@group(0) @binding(2) var<storage, read> S: array<f32>;
@group(0) @binding(3) var<storage, read> LM: array<f32>;
// [kv_head][row][slot * NG + group] x (HD4 accumulator vec4s + one (max, sum, 0, 0) vec4)
@group(0) @binding(4) var<storage, read_write> PART: array<vec4<f32>>;

var<private> mx: array<f32, QB>;
var<private> sum: array<f32, QB>;
var<private> acc: array<vec4<f32>, QB * CV>;

@compute @workgroup_size(VL)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let ci = lane % CL;
  let gi = lane / CL;
  if (gi >= NG) {
    return;
  }
  let chunk = wg.x;
  let row0 = wg.y * QB;
  let kvh = wg.z;
  let c0 = chunk * P.chunk_tokens;
  let ct = min(P.chunk_tokens, P.window_tokens - c0);
  let pos0 = P.window_start + c0;
  let slot = P.slot_base + chunk;

  // The chunk's extent any row sees (as in pass 1) and each row's chunk maximum.
  var end = 0u;
  //#unroll r QB
  {
    let g = P.row_base + row0 + {r};
    let ok = row0 + {r} < P.rows;
    let causal_lim = P.seq_len - P.q_tokens + g / P.group + 1u;
    let l = select(0u, select(P.seq_len, causal_lim, P.causal != 0u), ok);
    if (l > pos0) {
      end = max(end, min(ct, l - pos0));
    }
    mx[{r}] = TQ_NEG;
    if (ok) {
      let lm = ((kvh * P.rows + row0 + {r}) * P.num_slots + slot) * WG;
      //#unroll i WG
      mx[{r}] = max(mx[{r}], LM[lm + {i}]);
      //#end
    }
  }
  //#end

  // p = exp(s - max); a row that sees nothing keeps p = 0 (its max is TQ_NEG).
  let vstride = P.kv_heads * VW;
  let vcol = kvh * VW + ci * CV * select(4u, 2u, F16);
  for (var t = gi; t < end; t += NG) {
    // Explicit initialisers: naga zeroes an uninitialised var only once, not per iteration.
    var p = array<f32, QB>();
    //#unroll r QB
    if (row0 + {r} < P.rows) {
      let s = S[(kvh * P.rows + row0 + {r}) * P.s_stride + c0 + t];
      p[{r}] = select(0.0, exp(s - mx[{r}]), mx[{r}] > 0.5 * TQ_NEG);
      sum[{r}] += p[{r}];
    }
    //#end
    let vb = (c0 + t) * vstride + vcol;
    //#unroll j CV
    {
      //#if F16
      let v = tq_unpack4(vec2<u32>(V[vb + 2u * {j}], V[vb + 2u * {j} + 1u]));
      //#else
      let b = vb + 4u * {j};
      let v = bitcast<vec4<f32>>(vec4<u32>(V[b], V[b + 1u], V[b + 2u], V[b + 3u]));
      //#end
      //#unroll r QB
      acc[{r} * CV + {j}] += p[{r}] * v;
      //#end
    }
    //#end
  }

  //#unroll r QB
  if (row0 + {r} < P.rows) {
    let at = ((kvh * P.rows + row0 + {r}) * P.num_slots * NG + slot * NG + gi) * (HD4 + 1u);
    //#unroll j CV
    PART[at + ci * CV + {j}] = acc[{r} * CV + {j}];
    //#end
    if (ci == 0u) {
      PART[at + HD4] = vec4<f32>(mx[{r}], sum[{r}], 0.0, 0.0);
    }
  }
  //#end
}
