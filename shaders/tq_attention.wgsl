// Fused split-K attention straight from the TurboQuant cache (keys and values stay packed, nothing
// is dequantized to memory): pass 2 of 3 (tq_rotate_query.wgsl rotates the queries first,
// tq_attention_reduce.wgsl merges the partials and rotates the output back).
//
// One workgroup of LANES (the software adapter's SIMD width) invocations per (KV head, chunk of
// tokens, batch of ROWS query rows); the KV head is the fastest grid axis. A row is (query token,
// query head of the KV head's group): in decode one workgroup serves every query head of a group,
// so each code is decoded once for all of them. Invocation `lane` owns tokens lane, lane + LANES,
// ... of the chunk (at most TL of them). The head dimension is walked in units of UNIT
// coordinates (whole blocks whose codes fill whole words):
//  1. scores: for each unit, its rotated query values are loaded once, then every token's codes
//     of the unit are decoded (centroid values from an odd polynomial or a select tree over
//     literal constants, no memory access) and dotted with them, times the f16 block scale,
//     into the token's scores `sc`;
//  2. softmax: the maximum per row over the whole workgroup, then p = exp(score - max) in place;
//  3. values: for each unit, p * (scale * centroid) of every token's V codes is accumulated in the
//     values' rotated domain, and the unit's accumulators are stored as this invocation's partial.
// Every invocation writes its own partial (the same maximum for all of them, so the reduce pass
// only adds them up); no rescaling, no branches in the hot loops.
//
// Written for llvmpipe, where every storage or workgroup load costs a scalar loop over the lanes
// and both sides of every branch execute. Loops marked `// unroll` are expanded by the host
// (unrollMarkedLoops in src/attention/_tq_attention.ts), so every private array index inside a
// unit is a constant (for the GL backend, whose GLSL compiler takes minutes over that, they stay
// loops: keepMarkedLoops). Mesa counts the iterations of all loops of an invocation together and
// stops them all after 65,535; the host bounds a chunk's tokens accordingly (loopIterations).
//
// Prepended by the host: HEAD_DIM, BLOCK, NUM_BLOCKS, ROWS, KV_HEADS, K_BITS, V_BITS (code bits),
// K_WORDS, V_WORDS (words per head row), K_SCALE_WORDS, V_SCALE_WORDS (scale words per token),
// SB (blocks per unit), K_UW, V_UW (code words per unit), K_VEC, V_VEC (words per load of a
// unit's codes), PROD, NORM_WORDS, LANES, TL; then generated helpers: aliases KVec / VVec (the load types), kvec_at / vvec_at
// (word c of a load), kval / vval (centroid of a code), and the bindings QR / SQ (rotated
// queries and, in prod mode, their QJL projections) with their loads q4 / sq4.

const HEAD_DIM4: u32 = HEAD_DIM / 4u;
const UNIT: u32 = SB * BLOCK; // coordinates per unit
const UNIT4: u32 = UNIT / 4u;
const NUNITS: u32 = NUM_BLOCKS / SB;
const K_MASK: u32 = (1u << K_BITS) - 1u;
const V_MASK: u32 = (1u << V_BITS) - 1u;
const K_UL: u32 = K_UW / K_VEC; // loads per unit
const V_UL: u32 = V_UW / V_VEC;
const SIGN_UW: u32 = (UNIT + 31u) / 32u; // sign words a unit's signs touch

struct Params {
  seq_len: u32,
  q_tokens: u32,
  causal: u32,
  group: u32, // query heads per KV head
  window_start: u32, // absolute position of the bound window's first token
  window_tokens: u32, // tokens in the window
  chunk_tokens: u32, // tokens per chunk (at most LANES * TL)
  slot_base: u32, // partial slot of the window's first chunk
  num_slots: u32, // partial slots per row
  rows: u32, // rows of this dispatch's row group, per KV head
  row_base: u32, // first row (per KV head: q_token * group + head in group) of the group
  k_off: u32, // offset of the window's first K row inside the bound range, in KVec loads
  ks_off: u32, // the same in words for the K scale rows,
  v_off: u32, // the V rows (VVec loads),
  vs_off: u32, // the V scale rows,
  sg_off: u32, // the sign rows (words),
  nm_off: u32, // the residual norm rows (words)
  q_off: u32, // vec4 index of the row group's first query inside the bound QR range
  sq_off: u32, // the same for SQ
  one: u32, // 1: the bound factor of loops kept as loops (keepMarkedLoops)
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> KI: array<KVec>;
@group(0) @binding(2) var<storage, read> KS: array<u32>;
@group(0) @binding(3) var<storage, read> VI: array<VVec>;
@group(0) @binding(4) var<storage, read> VS: array<u32>;
// Binding 5: QR, rotated and scaled queries [row of the group][KV head][HEAD_DIM] (generated).
// Partials [KV head][row of the group][slot][lane] x (HEAD_DIM4 accumulator vec4s, then
// (max, sum, 0, 0)).
@group(0) @binding(6) var<storage, read_write> PART: array<vec4<f32>>;
// prod mode: QJL sign rows and residual norm rows (other buffers stand in otherwise), and
// binding 9: SQ, the queries' QJL projections, laid out as QR (generated).
@group(0) @binding(7) var<storage, read> SG: array<u32>;
@group(0) @binding(8) var<storage, read> NM: array<u32>;

var<workgroup> red: array<f32, ROWS * LANES>;

// Code j (a constant once the loops unroll) of a unit's packed codes.
fn kcode(w: ptr<function, array<u32, K_UW>>, j: u32) -> u32 {
  let bit = j * K_BITS;
  let wi = bit >> 5u;
  let sh = bit & 31u;
  var c = (*w)[wi] >> sh;
  if (sh + K_BITS > 32u) {
    c = c | ((*w)[wi + 1u] << (32u - sh));
  }
  return c & K_MASK;
}

fn vcode(w: ptr<function, array<u32, V_UW>>, j: u32) -> u32 {
  let bit = j * V_BITS;
  let wi = bit >> 5u;
  let sh = bit & 31u;
  var c = (*w)[wi] >> sh;
  if (sh + V_BITS > 32u) {
    c = c | ((*w)[wi + 1u] << (32u - sh));
  }
  return c & V_MASK;
}

fn word_of(which: u32, i: u32) -> u32 {
  if (which == 0u) {
    return KS[i];
  } else if (which == 1u) {
    return VS[i];
  }
  return NM[i];
}

// f16 value `f` of a row of f16 pairs starting at word `row` (which: 0 K scales, 1 V scales,
// 2 residual norms).
fn half_at(row: u32, f: u32, which: u32) -> f32 {
  let pair = unpack2x16float(word_of(which, row + (f >> 1u)));
  return select(pair.x, pair.y, (f & 1u) == 1u);
}

// The SB block scales of a unit, f16 values first .. first + SB - 1 of a scale row: one load per
// pair where the pairs line up.
fn unit_scales(row: u32, first: u32, which: u32) -> array<f32, SB> {
  var out: array<f32, SB>;
  if (SB % 2u == 0u && NUM_BLOCKS % 2u == 0u) {
    for (var w = 0u; w < SB / 2u; w++) { // unroll
      let pair = unpack2x16float(word_of(which, row + (first >> 1u) + w));
      out[2u * w] = pair.x;
      out[2u * w + 1u] = pair.y;
    }
  } else {
    for (var i = 0u; i < SB; i++) { // unroll
      out[i] = half_at(row, first + i, which);
    }
  }
  return out;
}

@compute @workgroup_size(LANES)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let kvh = wg.x;
  let chunk = wg.y;
  let c0 = chunk * P.chunk_tokens; // window-relative first token of the chunk
  let n = min(P.chunk_tokens, P.window_tokens - c0);
  let pos0 = P.window_start + c0;

  // The rows of this workgroup: limits (positions they may see) and query offsets.
  var lim: array<u32, ROWS>;
  var qrow: array<u32, ROWS>;
  var max_lim = 0u;
  for (var r = 0u; r < ROWS; r++) { // unroll
    let g = wg.z * ROWS + r;
    let gr = min(g, P.rows - 1u);
    let qi = (P.row_base + gr) / P.group;
    qrow[r] = (gr * KV_HEADS + kvh) * HEAD_DIM4;
    var l = 0u;
    if (g < P.rows) {
      l = select(P.seq_len, P.seq_len - P.q_tokens + qi + 1u, P.causal != 0u);
    }
    lim[r] = l;
    max_lim = max(max_lim, l);
  }
  // Tokens of the chunk that some row sees (uniform: the loops below never diverge).
  var end = 0u;
  if (max_lim > pos0) {
    end = min(n, max_lim - pos0);
  }
  let steps = (end + LANES - 1u) / LANES; // tokens of this invocation (the last may repeat)

  // ---- 1. scores <R q, y_t> = sum_b scale_b * sum_i q_i * centroid(code_i), unit by unit ----
  var sc: array<array<f32, ROWS>, TL>;
  for (var u = 0u; u < NUNITS; u++) {
    var qu: array<f32, ROWS * UNIT>;
    for (var r = 0u; r < ROWS; r++) { // unroll
      for (var i = 0u; i < UNIT4; i++) { // unroll
        let v = q4(P.q_off + qrow[r] + u * UNIT4 + i);
        qu[r * UNIT + 4u * i] = v.x;
        qu[r * UNIT + 4u * i + 1u] = v.y;
        qu[r * UNIT + 4u * i + 2u] = v.z;
        qu[r * UNIT + 4u * i + 3u] = v.w;
      }
    }
    var squ: array<f32, ROWS * UNIT>;
    if (PROD) {
      for (var r = 0u; r < ROWS; r++) { // unroll
        for (var i = 0u; i < UNIT4; i++) { // unroll
          let v = sq4(P.sq_off + qrow[r] + u * UNIT4 + i);
          squ[r * UNIT + 4u * i] = v.x;
          squ[r * UNIT + 4u * i + 1u] = v.y;
          squ[r * UNIT + 4u * i + 2u] = v.z;
          squ[r * UNIT + 4u * i + 3u] = v.w;
        }
      }
    }
    for (var j = 0u; j < steps; j++) {
      let t = c0 + min(j * LANES + lane, end - 1u); // window-relative token (clamped)
      var kw: array<u32, K_UW>;
      let kb = P.k_off + ((t * KV_HEADS + kvh) * K_WORDS + u * K_UW) / K_VEC;
      for (var w = 0u; w < K_UL; w++) { // unroll
        let v = KI[kb + w];
        for (var c = 0u; c < K_VEC; c++) { // unroll
          kw[w * K_VEC + c] = kvec_at(v, c);
        }
      }
      // Accumulators are zeroed by assignment: naga initialises a declared variable once per
      // invocation, not each time a loop iteration reaches the declaration.
      var s: array<f32, ROWS>;
      for (var r = 0u; r < ROWS; r++) { // unroll
        s[r] = 0.0;
      }
      let ks = unit_scales(P.ks_off + t * K_SCALE_WORDS, kvh * NUM_BLOCKS + u * SB, 0u);
      for (var sb = 0u; sb < SB; sb++) { // unroll
        let scale = ks[sb];
        var part: array<f32, ROWS>;
        for (var r = 0u; r < ROWS; r++) { // unroll
          part[r] = 0.0;
        }
        for (var i = 0u; i < BLOCK; i++) { // unroll
          let jj = sb * BLOCK + i;
          let val = kval(kcode(&kw, jj));
          for (var r = 0u; r < ROWS; r++) { // unroll
            part[r] = fma(qu[r * UNIT + jj], val, part[r]);
          }
        }
        for (var r = 0u; r < ROWS; r++) { // unroll
          s[r] = fma(part[r], scale, s[r]);
        }
      }
      if (PROD) {
        // + sqrt(pi/2) / d * |r| * <S R q, signs> (the factor is folded into sq): the unit's
        // part of the sum, times the residual norm.
        var sgw: array<u32, SIGN_UW>;
        let sgb = P.sg_off + (t * KV_HEADS + kvh) * ((HEAD_DIM + 31u) / 32u) + (u * UNIT) / 32u;
        for (var w = 0u; w < SIGN_UW; w++) { // unroll
          sgw[w] = SG[sgb + w];
        }
        let first = (u * UNIT) % 32u; // bit of the unit's first sign in sgw[0]
        let rnorm = half_at(P.nm_off + t * NORM_WORDS, kvh, 2u);
        for (var r = 0u; r < ROWS; r++) { // unroll
          var qjl: f32;
          qjl = 0.0;
          for (var i = 0u; i < UNIT; i++) { // unroll
            let x = squ[r * UNIT + i];
            let bit = first + i;
            qjl = qjl + select(-x, x, ((sgw[bit >> 5u] >> (bit & 31u)) & 1u) == 1u);
          }
          s[r] = fma(rnorm, qjl, s[r]);
        }
      }
      for (var r = 0u; r < ROWS; r++) { // unroll
        sc[j][r] = select(sc[j][r], 0.0, u == 0u) + s[r];
      }
    }
  }

  // ---- 2. softmax: the workgroup's maximum per row, p = exp(score - max), sums ----
  var m: array<f32, ROWS>;
  for (var r = 0u; r < ROWS; r++) { // unroll
    m[r] = TQ_NEG;
  }
  for (var j = 0u; j < steps; j++) {
    let idx = j * LANES + lane;
    let pos = pos0 + min(idx, end - 1u);
    for (var r = 0u; r < ROWS; r++) { // unroll
      let sr = select(TQ_NEG, sc[j][r], idx < end && pos < lim[r]);
      sc[j][r] = sr;
      m[r] = max(m[r], sr);
    }
  }
  for (var r = 0u; r < ROWS; r++) { // unroll
    red[r * LANES + lane] = m[r];
  }
  workgroupBarrier();
  for (var r = 0u; r < ROWS; r++) { // unroll
    var mx = TQ_NEG;
    for (var i = 0u; i < LANES; i++) {
      mx = max(mx, red[r * LANES + i]);
    }
    m[r] = mx;
  }
  var l: array<f32, ROWS>;
  for (var r = 0u; r < ROWS; r++) { // unroll
    l[r] = 0.0;
  }
  for (var j = 0u; j < steps; j++) {
    for (var r = 0u; r < ROWS; r++) { // unroll
      let sr = sc[j][r];
      // Invisible tokens (TQ_NEG) and rows that see nothing here get p = 0.
      let p = select(0.0, exp(sr - m[r]), sr > 0.5 * TQ_NEG);
      sc[j][r] = p;
      l[r] = l[r] + p;
    }
  }

  // ---- 3. values: acc += p * scale_b * centroid(code), unit by unit, straight to PART ----
  for (var u = 0u; u < NUNITS; u++) {
    var acc: array<f32, ROWS * UNIT>;
    for (var i = 0u; i < ROWS * UNIT; i++) { // unroll
      acc[i] = 0.0;
    }
    for (var j = 0u; j < steps; j++) {
      let t = c0 + min(j * LANES + lane, end - 1u);
      var vw: array<u32, V_UW>;
      let vb = P.v_off + ((t * KV_HEADS + kvh) * V_WORDS + u * V_UW) / V_VEC;
      for (var w = 0u; w < V_UL; w++) { // unroll
        let v = VI[vb + w];
        for (var c = 0u; c < V_VEC; c++) { // unroll
          vw[w * V_VEC + c] = vvec_at(v, c);
        }
      }
      var p: array<f32, ROWS>;
      for (var r = 0u; r < ROWS; r++) { // unroll
        p[r] = sc[j][r];
      }
      let vs = unit_scales(P.vs_off + t * V_SCALE_WORDS, kvh * NUM_BLOCKS + u * SB, 1u);
      for (var sb = 0u; sb < SB; sb++) { // unroll
        let scale = vs[sb];
        var ps: array<f32, ROWS>;
        for (var r = 0u; r < ROWS; r++) { // unroll
          ps[r] = p[r] * scale;
        }
        for (var i = 0u; i < BLOCK; i++) { // unroll
          let jj = sb * BLOCK + i;
          let val = vval(vcode(&vw, jj));
          for (var r = 0u; r < ROWS; r++) { // unroll
            acc[r * UNIT + jj] = fma(ps[r], val, acc[r * UNIT + jj]);
          }
        }
      }
    }
    for (var r = 0u; r < ROWS; r++) { // unroll
      let g = wg.z * ROWS + r;
      if (g < P.rows) {
        let slot = (((kvh * P.rows + g) * P.num_slots + P.slot_base + chunk) * LANES + lane) *
          (HEAD_DIM4 + 1u);
        for (var i = 0u; i < UNIT4; i++) { // unroll
          PART[slot + u * UNIT4 + i] = vec4<f32>(
            acc[r * UNIT + 4u * i],
            acc[r * UNIT + 4u * i + 1u],
            acc[r * UNIT + 4u * i + 2u],
            acc[r * UNIT + 4u * i + 3u],
          );
        }
        if (u == 0u) {
          PART[slot + HEAD_DIM4] = vec4<f32>(m[r], l[r], 0.0, 0.0);
        }
      }
    }
  }
}
