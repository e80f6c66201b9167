// Merges split-K attention partials. A partial slot holds HD4 accumulator vec4s (sum of
// p * v with p = exp(score - max)) and one (max, sum, 0, 0) vec4. Workgroup (row, kv head, j)
// merges slots j * fan_in .. j * fan_in + fan_in - 1 of its row into output slot j, or, in the
// final pass, writes acc / sum to out[head][q_token][HD]. fan_in bounds the loop (Mesa's
// 65,535-iteration cap); the host chains passes when a row has more slots.
// Prepended by the host: HD (head dim, multiple of 4), WG (invocations, >= HD / 4).

const HD4: u32 = HD / 4u;

struct Params {
  num_in: u32,      // input slots per row
  fan_in: u32,      // input slots per output slot
  num_out: u32,     // output slots per row (1 in the final pass)
  rows: u32,        // rows in this row batch (per KV head)
  row_base: u32,    // first row of this batch
  group: u32,       // query heads per KV head
  q_tokens: u32,
  final_pass: u32,  // 1: normalise and write [head][q_token][HD]
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> PIN: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> POUT: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  if (lane >= HD4) {
    return;
  }
  let row = wg.x;
  let kvh = wg.y;
  let j = wg.z;
  let i0 = j * P.fan_in;
  let i1 = min(i0 + P.fan_in, P.num_in);
  let base = (kvh * P.rows + row) * P.num_in;
  var m = TQ_NEG;
  var l = 0.0;
  var acc = vec4<f32>(0.0);
  for (var i = i0; i < i1; i++) {
    let slot = (base + i) * (HD4 + 1u);
    let ml = PIN[slot + HD4];
    let nm = max(m, ml.x);
    let a = exp(m - nm);
    let b = exp(ml.x - nm);
    l = l * a + ml.y * b;
    acc = acc * a + PIN[slot + lane] * b;
    m = nm;
  }
  if (P.final_pass != 0u) {
    let g = P.row_base + row;
    let h = kvh * P.group + g % P.group;
    let o = (h * P.q_tokens + g / P.group) * HD4 + lane;
    POUT[o] = select(vec4<f32>(0.0), acc / l, l > 0.0);
  } else {
    let slot = ((kvh * P.rows + row) * P.num_out + j) * (HD4 + 1u);
    POUT[slot + lane] = acc;
    if (lane == 0u) {
      POUT[slot + HD4] = vec4<f32>(m, l, 0.0, 0.0);
    }
  }
}
