/**
 * f16 conversion through Deno's built-in `Float16Array` (IEEE rounding, subnormals included).
 *
 * @module
 */

const f16 = new Float16Array(1);
const bits = new Uint16Array(f16.buffer);

/** Largest finite f16 value. */
export const F16_MAX = 65504;

/** The f16 bit pattern of `x`, rounded to nearest even. */
export function f16Bits(x: number): number {
  f16[0] = x;
  return bits[0];
}

/** The value of an f16 bit pattern. */
export function f16Value(h: number): number {
  bits[0] = h;
  return f16[0];
}
