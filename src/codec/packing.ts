/**
 * Dense bit packing of codes into u32 words, least significant bit first. Code `j` of a row
 * occupies bits `j * bits .. j * bits + bits - 1` of the row, so a code may straddle two words.
 * A row is a whole number of words, which keeps every row 4-byte aligned.
 *
 * @module
 */

/** Number of u32 words that hold `count` codes of `bits` bits. */
export function wordsFor(count: number, bits: number): number {
  return Math.ceil((count * bits) / 32);
}

/** Packs `codes` (each < 2^bits) into `out` starting at word `outOffset`. */
export function packCodes(
  codes: ArrayLike<number>,
  bits: number,
  out: Uint32Array,
  outOffset: number,
): void {
  const words = wordsFor(codes.length, bits);
  out.fill(0, outOffset, outOffset + words);
  for (let j = 0; j < codes.length; j++) {
    const bit = j * bits;
    const w = outOffset + (bit >>> 5);
    const shift = bit & 31;
    const c = codes[j];
    out[w] |= c << shift;
    if (shift + bits > 32) out[w + 1] |= c >>> (32 - shift);
  }
}

/** Unpacks `count` codes of `bits` bits from `words` starting at word `offset`. */
export function unpackCodes(
  words: Uint32Array,
  offset: number,
  count: number,
  bits: number,
  out: Uint8Array = new Uint8Array(count),
): Uint8Array {
  const mask = (1 << bits) - 1;
  for (let j = 0; j < count; j++) {
    const bit = j * bits;
    const w = offset + (bit >>> 5);
    const shift = bit & 31;
    let c = words[w] >>> shift;
    if (shift + bits > 32) c |= words[w + 1] << (32 - shift);
    out[j] = c & mask;
  }
  return out;
}
