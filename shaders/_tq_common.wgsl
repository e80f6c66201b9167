// Helpers shared by the TurboQuant kernels. The host prepends the constants of a cache:
// HEAD_DIM, BLOCK, NUM_BLOCKS, CODE_BITS, LEVELS (f32 arithmetic mirrors src/codec/codec.ts).

// f16 bit pattern of x, rounded to nearest even, clamped to the largest finite value (the
// CPU codec clamps scales the same way). Integer arithmetic, so every adapter agrees.
fn f16_bits(x: f32) -> u32 {
  let b = bitcast<u32>(x);
  let sign = (b >> 16u) & 0x8000u;
  let a = b & 0x7fffffffu;
  if (a >= 0x477fe000u) {
    return sign | 0x7bffu;
  }
  if (a >= 0x38800000u) {
    var h = (((a >> 23u) - 112u) << 10u) | ((a >> 13u) & 0x3ffu);
    let rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u) == 1u)) {
      h += 1u;
    }
    return sign | h;
  }
  let e = a >> 23u;
  if (e < 102u) {
    return sign;
  }
  let shift = 126u - e; // 14 ..= 24
  let m = (a & 0x7fffffu) | 0x800000u;
  var h = m >> shift;
  let rem = m & ((1u << shift) - 1u);
  let half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (h & 1u) == 1u)) {
    h += 1u;
  }
  return sign | h;
}

// Value of an f16 bit pattern (finite patterns only), exact.
fn f16_value(h: u32) -> f32 {
  let e = (h >> 10u) & 31u;
  let m = h & 0x3ffu;
  var v: f32;
  if (e == 0u) {
    v = f32(m) * 5.9604644775390625e-8;
  } else {
    v = bitcast<f32>(((e + 112u) << 23u) | (m << 13u));
  }
  return select(v, -v, (h & 0x8000u) != 0u);
}

// Linear invocation index of a 2D dispatch whose rows hold `width` invocations.
fn linear_index(gid: vec3<u32>, width: u32) -> u32 {
  return gid.x + gid.y * width;
}

// Normalised Walsh-Hadamard transform of one block, stages h = 1, 2, 4, ... then one scale,
// exactly the order of src/codec/rotation.ts; FWHT_SCALE is 1/sqrt(BLOCK) rounded to f32.
fn fwht_block(y: ptr<function, array<f32, BLOCK>>) {
  for (var h = 1u; h < BLOCK; h = h * 2u) {
    for (var i = 0u; i < BLOCK; i = i + 2u * h) {
      for (var j = i; j < i + h; j = j + 1u) {
        let a = (*y)[j];
        let b = (*y)[j + h];
        (*y)[j] = a + b;
        (*y)[j + h] = a - b;
      }
    }
  }
  for (var j = 0u; j < BLOCK; j = j + 1u) {
    (*y)[j] = (*y)[j] * FWHT_SCALE;
  }
}

// The code at bit `shift` of word `lo`, continued in word `hi` when it straddles the two.
fn code_at(lo: u32, hi: u32, shift: u32) -> u32 {
  var c = lo >> shift;
  if (shift + CODE_BITS > 32u) {
    c = c | (hi << (32u - shift));
  }
  return c & (LEVELS - 1u);
}
