/**
 * SentencePiece-style BPE tokenizer of llama2.c models: start from single characters (with a
 * leading U+2581 and spaces written as U+2581), fall back to bytes as token id byte + 3, then
 * repeatedly merge the adjacent pair whose merged piece has the highest score.
 *
 * @module
 */

import type { Vocabulary } from "./model.ts";

/** Token id of the beginning-of-sequence marker. */
export const BOS_ID = 1;
/** Token id of the end-of-sequence marker. */
export const EOS_ID = 2;
/** Byte b is token b + BYTE_OFFSET when no piece covers it. */
export const BYTE_OFFSET = 3;

const SPACE_MARK = "\u2581";
const BYTE_PIECE = /^<0x([0-9A-Fa-f]{2})>$/;

/** Options of {@linkcode Tokenizer.encode}. */
export interface EncodeOptions {
  /** Prepend BOS (default true). */
  bos?: boolean;
  /** Append EOS (default false). */
  eos?: boolean;
}

/** Encoder/decoder over a model's vocabulary. */
export class Tokenizer {
  /** The vocabulary it encodes with. */
  readonly vocab: Vocabulary;
  readonly #ids: Map<string, number> = new Map();
  readonly #bytes: (Uint8Array | null)[];

  /**
   * Indexes the vocabulary for encoding and decoding.
   * @param vocab The model's vocabulary (pieces with U+2581 for spaces).
   */
  constructor(vocab: Vocabulary) {
    this.vocab = vocab;
    const encoder = new TextEncoder();
    this.#bytes = vocab.pieces.map((piece, id) => {
      // First occurrence wins when a piece repeats.
      if (!this.#ids.has(piece)) this.#ids.set(piece, id);
      const m = BYTE_PIECE.exec(piece);
      if (m) return new Uint8Array([parseInt(m[1], 16)]);
      if (id === BOS_ID || id === EOS_ID || piece === "<unk>") return null; // control tokens
      return encoder.encode(piece.replaceAll(SPACE_MARK, " "));
    });
  }

  /** Number of tokens in the vocabulary. */
  get size(): number {
    return this.vocab.pieces.length;
  }

  /** Token id of a piece, or undefined. */
  idOf(piece: string): number | undefined {
    return this.#ids.get(piece);
  }

  /** Encodes text into token ids. */
  encode(text: string, options: EncodeOptions = {}): number[] {
    const { bos = true, eos = false } = options;
    const ids: number[] = [];
    if (bos) ids.push(BOS_ID);
    if (text.length > 0) {
      const normalized = SPACE_MARK + text.replaceAll(" ", SPACE_MARK);
      const tokens: number[] = [];
      const encoder = new TextEncoder();
      for (const ch of normalized) { // iterates code points
        const id = this.#ids.get(ch);
        if (id !== undefined) tokens.push(id);
        else for (const b of encoder.encode(ch)) tokens.push(b + BYTE_OFFSET);
      }
      ids.push(...this.#merge(tokens));
    }
    if (eos) ids.push(EOS_ID);
    return ids;
  }

  /** Greedy BPE: merge the best-scoring adjacent pair until none merges. */
  #merge(tokens: number[]): number[] {
    const { pieces, scores } = this.vocab;
    // pairId[i] / pairScore[i] describe merging tokens[i] and tokens[i + 1]; only the two
    // neighbours of a merge need recomputing, so each round is one cheap scan.
    const pairId: number[] = [];
    const pairScore: number[] = [];
    const evaluate = (i: number): void => {
      const id = this.#ids.get(pieces[tokens[i]] + pieces[tokens[i + 1]]);
      pairId[i] = id ?? -1;
      pairScore[i] = id === undefined ? -Infinity : scores[id];
    };
    for (let i = 0; i + 1 < tokens.length; i++) evaluate(i);
    for (;;) {
      let best = -1;
      let bestScore = -Infinity;
      for (let i = 0; i + 1 < tokens.length; i++) {
        if (pairId[i] >= 0 && pairScore[i] > bestScore) {
          bestScore = pairScore[i];
          best = i;
        }
      }
      if (best < 0) return tokens;
      tokens[best] = pairId[best];
      tokens.splice(best + 1, 1);
      pairId.splice(best + 1, 1);
      pairScore.splice(best + 1, 1);
      if (best > 0) evaluate(best - 1);
      if (best + 1 < tokens.length) evaluate(best);
      else pairId.length = pairScore.length = tokens.length - 1;
    }
  }

  /**
   * Bytes a token contributes after `prev` (SentencePiece drops the leading space of the first
   * piece after BOS). Control tokens contribute nothing.
   */
  pieceBytes(id: number, prev: number = -1): Uint8Array {
    const bytes = this.#bytes[id];
    if (!bytes) return new Uint8Array(0);
    if (prev === BOS_ID && bytes[0] === 0x20) return bytes.subarray(1);
    return bytes;
  }

  /** Decodes token ids to text (U+2581 → space, `<0xNN>` → that byte, BOS/EOS dropped). */
  decode(ids: readonly number[]): string {
    const chunks: Uint8Array[] = [];
    let total = 0;
    let prev = -1;
    for (const id of ids) {
      const b = this.pieceBytes(id, prev);
      chunks.push(b);
      total += b.length;
      prev = id;
    }
    const all = new Uint8Array(total);
    let o = 0;
    for (const c of chunks) {
      all.set(c, o);
      o += c.length;
    }
    return new TextDecoder().decode(all);
  }
}
