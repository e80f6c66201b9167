/**
 * Loader for llama2.c-family checkpoints: the "v1" export (one file with the vocabulary inside)
 * and the legacy llama2.c format (28-byte header + a separate `tokenizer.bin`).
 *
 * Both are turned into the same {@linkcode LlamaModel}: separate, 4-byte aligned Float32Array
 * views per weight, in the names of the forward pass (gate / up / down), and a vocabulary whose
 * pieces write spaces as U+2581 (the legacy tokenizer writes plain spaces; they are mapped).
 *
 * @module
 */

/** Architecture hyper-parameters of a llama2.c model. */
export interface LlamaConfig {
  /** Model (residual stream) width. */
  dim: number;
  /** FFN hidden width. */
  hiddenDim: number;
  /** Number of transformer layers. */
  numLayers: number;
  /** Number of query heads. */
  numHeads: number;
  /** Number of key/value heads (grouped-query attention when smaller than numHeads). */
  numKvHeads: number;
  /** Vocabulary size. */
  vocabSize: number;
  /** Training context length (maximum positions). */
  seqLen: number;
  /** Per-head width: dim / numHeads. */
  headDim: number;
  /** Width of K and V: numKvHeads * headDim. */
  kvDim: number;
  /** Whether the classifier is the token embedding matrix. */
  sharedClassifier: boolean;
}

/** Weights of one transformer layer; matrices are row-major [out, in] (y = W x). */
export interface LayerWeights {
  /** Attention RMSNorm gain [dim]. */
  attnNorm: Float32Array;
  /** Query projection [dim, dim]. */
  wq: Float32Array;
  /** Key projection [kvDim, dim]. */
  wk: Float32Array;
  /** Value projection [kvDim, dim]. */
  wv: Float32Array;
  /** Output projection [dim, dim]. */
  wo: Float32Array;
  /** FFN RMSNorm gain [dim]. */
  ffnNorm: Float32Array;
  /** SwiGLU gate projection [hiddenDim, dim] (llama2.c's w1). */
  wGate: Float32Array;
  /** SwiGLU up projection [hiddenDim, dim] (llama2.c's w3). */
  wUp: Float32Array;
  /** SwiGLU down projection [dim, hiddenDim] (llama2.c's w2). */
  wDown: Float32Array;
}

/** All weights of a model. */
export interface LlamaWeights {
  /** Token embedding [vocabSize, dim]. */
  tokenEmbedding: Float32Array;
  /** Per-layer weights. */
  layers: LayerWeights[];
  /** Final RMSNorm gain [dim]. */
  finalNorm: Float32Array;
  /** Classifier [vocabSize, dim]; the same array as tokenEmbedding when shared. */
  classifier: Float32Array;
}

/** The tokenizer vocabulary: one piece and merge score per token id. */
export interface Vocabulary {
  /** Token pieces as text, spaces written as U+2581 ("▁"); byte tokens look like `<0x0A>`. */
  pieces: string[];
  /** Merge score per token (higher merges first). */
  scores: Float32Array;
}

/** A loaded model: configuration, weights and vocabulary. */
export interface LlamaModel {
  /** Which file format it was read from. */
  format: "v1" | "legacy";
  /** Architecture hyper-parameters. */
  config: LlamaConfig;
  /** Weights. */
  weights: LlamaWeights;
  /** Tokenizer vocabulary. */
  vocab: Vocabulary;
}

/** Default location of the bundled 260K-parameter TinyStories model (repo's ../shared/models). */
export const DEFAULT_MODEL_URL: URL = new URL(
  "../../../shared/models/stories260k.bin",
  import.meta.url,
);

const V1_MAGIC = "llama";
const V1_VOCAB_OFFSET = 256;
const LEGACY_HEADER_BYTES = 28;
const SPACE_MARK = "\u2581";

function fail(message: string): never {
  throw new Error(`llama2c model: ${message}`);
}

/** Builds the derived config fields and checks the shapes are consistent. */
function makeConfig(
  dim: number,
  hiddenDim: number,
  numLayers: number,
  numHeads: number,
  numKvHeads: number,
  vocabSize: number,
  seqLen: number,
  sharedClassifier: boolean,
): LlamaConfig {
  const values = { dim, hiddenDim, numLayers, numHeads, numKvHeads, vocabSize, seqLen };
  for (const [name, value] of Object.entries(values)) {
    if (!Number.isInteger(value) || value <= 0) {
      fail(`${name} must be a positive integer, got ${value}`);
    }
  }
  if (dim % numHeads !== 0) fail(`dim ${dim} is not a multiple of numHeads ${numHeads}`);
  if (numHeads % numKvHeads !== 0) {
    fail(`numHeads ${numHeads} is not a multiple of numKvHeads ${numKvHeads}`);
  }
  const headDim = dim / numHeads;
  if (headDim % 2 !== 0) fail(`headDim ${headDim} must be even for RoPE`);
  return { ...values, headDim, kvDim: numKvHeads * headDim, sharedClassifier };
}

/** Returns the bytes as a Float32Array, copying only when they are not 4-byte aligned. */
function alignedFloats(bytes: Uint8Array, offset: number, count: number): Float32Array {
  const end = offset + count * 4;
  if (end > bytes.length) fail(`file truncated: need ${end} bytes, have ${bytes.length}`);
  const start = bytes.byteOffset + offset;
  if (start % 4 === 0) return new Float32Array(bytes.buffer, start, count);
  // v1 weights start at an odd offset: a Float32Array view would throw, so copy once.
  return new Float32Array(bytes.slice(offset, end).buffer);
}

/** Number of f32 values in the weights, in the order they are stored. */
function weightCounts(c: LlamaConfig): Record<string, number> {
  const L = c.numLayers;
  return {
    tokenEmbedding: c.vocabSize * c.dim,
    attnNorm: L * c.dim,
    wq: L * c.dim * c.dim,
    wk: L * c.kvDim * c.dim,
    wv: L * c.kvDim * c.dim,
    wo: L * c.dim * c.dim,
    ffnNorm: L * c.dim,
    wGate: L * c.hiddenDim * c.dim,
    wUp: L * c.hiddenDim * c.dim,
    wDown: L * c.dim * c.hiddenDim,
    finalNorm: c.dim,
    ropeTables: c.seqLen * c.headDim, // legacy only: freq_cis_real + freq_cis_imag
    classifier: c.sharedClassifier ? 0 : c.vocabSize * c.dim,
  };
}

/** Storage order of the weight tensors in each format. */
const V1_ORDER = [
  "tokenEmbedding",
  "attnNorm",
  "wq",
  "wk",
  "wv",
  "wo",
  "ffnNorm",
  "wGate",
  "wUp",
  "wDown",
  "finalNorm",
  "classifier",
] as const;
const LEGACY_ORDER = [
  "tokenEmbedding",
  "attnNorm",
  "wq",
  "wk",
  "wv",
  "wo",
  "ffnNorm",
  "wGate",
  "wDown",
  "wUp",
  "finalNorm",
  "ropeTables",
  "classifier",
] as const;

type Tensor = typeof LEGACY_ORDER[number];

/** Total number of f32 weight values a file of this format holds. */
function totalFloats(c: LlamaConfig, format: "v1" | "legacy"): number {
  const counts = weightCounts(c);
  const order: readonly Tensor[] = format === "v1" ? V1_ORDER : LEGACY_ORDER;
  return order.reduce((sum, name) => sum + counts[name], 0);
}

/** Splits one flat weight array into per-tensor, per-layer views. */
function splitWeights(
  flat: Float32Array,
  c: LlamaConfig,
  format: "v1" | "legacy",
): LlamaWeights {
  const counts = weightCounts(c);
  const order: readonly Tensor[] = format === "v1" ? V1_ORDER : LEGACY_ORDER;
  const tensors = {} as Record<Tensor, Float32Array>;
  let pos = 0;
  for (const name of order) {
    tensors[name] = flat.subarray(pos, pos + counts[name]);
    pos += counts[name];
  }
  const L = c.numLayers;
  const layer = (name: keyof LayerWeights, l: number): Float32Array => {
    const per = counts[name] / L;
    return tensors[name].subarray(l * per, (l + 1) * per);
  };
  const layers: LayerWeights[] = [];
  for (let l = 0; l < L; l++) {
    layers.push({
      attnNorm: layer("attnNorm", l),
      wq: layer("wq", l),
      wk: layer("wk", l),
      wv: layer("wv", l),
      wo: layer("wo", l),
      ffnNorm: layer("ffnNorm", l),
      wGate: layer("wGate", l),
      wUp: layer("wUp", l),
      wDown: layer("wDown", l),
    });
  }
  return {
    tokenEmbedding: tensors.tokenEmbedding,
    layers,
    finalNorm: tensors.finalNorm,
    classifier: c.sharedClassifier ? tensors.tokenEmbedding : tensors.classifier,
  };
}

/** Reads `count` vocabulary entries (f32 score, i32 length, UTF-8 bytes) starting at `offset`. */
function readVocabEntries(
  bytes: Uint8Array,
  offset: number,
  count: number,
  mapSpaces: boolean,
): { vocab: Vocabulary; end: number } {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const decoder = new TextDecoder();
  const pieces: string[] = [];
  const scores = new Float32Array(count);
  let pos = offset;
  for (let i = 0; i < count; i++) {
    if (pos + 8 > bytes.length) fail(`vocabulary truncated at entry ${i}`);
    scores[i] = view.getFloat32(pos, true);
    const len = view.getInt32(pos + 4, true);
    pos += 8;
    if (len < 0 || pos + len > bytes.length) fail(`bad vocabulary entry ${i} (length ${len})`);
    const piece = decoder.decode(bytes.subarray(pos, pos + len));
    // llama2.c's tokenizer.bin writes SentencePiece's U+2581 as a plain space.
    pieces.push(mapSpaces ? piece.replaceAll(" ", SPACE_MARK) : piece);
    pos += len;
  }
  return { vocab: { pieces, scores }, end: pos };
}

/** True when the bytes start like a v1 export (`llama` at offset 5). */
export function isV1Model(bytes: Uint8Array): boolean {
  return bytes.length >= 10 && bytes[0] === 1 &&
    new TextDecoder().decode(bytes.subarray(5, 10)) === V1_MAGIC;
}

/**
 * Parses a "v1" file: version byte, `llama`, 7 i32 at offset 10 (dim, hidden_dim, seq_len,
 * vocab_size, n_layers, n_heads, n_kv_heads), the shared-classifier flag at 38, the vocabulary at
 * 256 and the f32 weights right after it (gate, up, down order).
 */
export function parseV1Model(bytes: Uint8Array): LlamaModel {
  if (!isV1Model(bytes)) fail("not a v1 file (no 'llama' magic at offset 5)");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const h = (i: number): number => view.getInt32(10 + 4 * i, true);
  const config = makeConfig(h(0), h(1), h(4), h(5), h(6), h(3), h(2), bytes[38] === 1);
  const { vocab, end } = readVocabEntries(bytes, V1_VOCAB_OFFSET, config.vocabSize, false);
  const count = totalFloats(config, "v1");
  if (end + count * 4 !== bytes.length) {
    fail(`expected ${end + count * 4} bytes for this config, file has ${bytes.length}`);
  }
  const weights = splitWeights(alignedFloats(bytes, end, count), config, "v1");
  return { format: "v1", config, weights, vocab };
}

/** Parses a legacy llama2.c `tokenizer.bin` (i32 max_token_length, then the entries). */
export function parseLegacyTokenizer(bytes: Uint8Array, vocabSize: number): Vocabulary {
  return readVocabEntries(bytes, 4, vocabSize, true).vocab;
}

/**
 * Parses a legacy llama2.c checkpoint: 7 i32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
 * vocab_size — negative when the classifier is separate — and seq_len), then the weights with
 * W_down before W_up and the RoPE tables after the final norm (skipped).
 */
export function parseLegacyModel(model: Uint8Array, tokenizer: Uint8Array): LlamaModel {
  if (model.length < LEGACY_HEADER_BYTES) fail("legacy file shorter than its header");
  const view = new DataView(model.buffer, model.byteOffset, model.byteLength);
  const h = (i: number): number => view.getInt32(4 * i, true);
  const rawVocab = h(5);
  const config = makeConfig(h(0), h(1), h(2), h(3), h(4), Math.abs(rawVocab), h(6), rawVocab > 0);
  const count = totalFloats(config, "legacy");
  if (LEGACY_HEADER_BYTES + count * 4 !== model.length) {
    fail(
      `expected ${LEGACY_HEADER_BYTES + count * 4} bytes for this config, file has ${model.length}`,
    );
  }
  const flat = alignedFloats(model, LEGACY_HEADER_BYTES, count);
  const weights = splitWeights(flat, config, "legacy");
  return {
    format: "legacy",
    config,
    weights,
    vocab: parseLegacyTokenizer(tokenizer, config.vocabSize),
  };
}

/**
 * Loads a model from disk. A v1 file carries its vocabulary; a legacy file needs
 * `tokenizerPath` (defaults to `tokenizer.bin` next to the model).
 */
export async function loadModel(
  path: string | URL = DEFAULT_MODEL_URL,
  tokenizerPath?: string | URL,
): Promise<LlamaModel> {
  const bytes = await Deno.readFile(path);
  if (isV1Model(bytes)) return parseV1Model(bytes);
  // llama2.c keeps tokenizer.bin beside the checkpoint.
  const tok = tokenizerPath ??
    (path instanceof URL
      ? new URL("tokenizer.bin", path)
      : path.replace(/[^/\\]*$/, "tokenizer.bin"));
  return parseLegacyModel(bytes, await Deno.readFile(tok));
}

/**
 * Serialises a model in the legacy llama2.c layout (RoPE tables included, as llama2.c's
 * export writes them). Used by the tests to prove the legacy loader; also handy to convert.
 */
export function writeLegacyModel(config: LlamaConfig, weights: LlamaWeights): Uint8Array {
  const count = totalFloats(config, "legacy");
  const out = new Uint8Array(LEGACY_HEADER_BYTES + count * 4);
  const view = new DataView(out.buffer);
  const header = [
    config.dim,
    config.hiddenDim,
    config.numLayers,
    config.numHeads,
    config.numKvHeads,
    config.sharedClassifier ? config.vocabSize : -config.vocabSize,
    config.seqLen,
  ];
  header.forEach((v, i) => view.setInt32(4 * i, v, true));
  const flat = new Float32Array(out.buffer, LEGACY_HEADER_BYTES, count);
  const concat = (get: (l: LayerWeights) => Float32Array): Float32Array => {
    const parts = weights.layers.map(get);
    const res = new Float32Array(parts.reduce((s, p) => s + p.length, 0));
    let o = 0;
    for (const p of parts) {
      res.set(p, o);
      o += p.length;
    }
    return res;
  };
  // freq_cis_real then freq_cis_imag, [seqLen, headDim / 2] each.
  const half = config.headDim / 2;
  const rope = new Float32Array(config.seqLen * config.headDim);
  for (let p = 0; p < config.seqLen; p++) {
    for (let i = 0; i < half; i++) {
      const angle = p / Math.pow(10000, (2 * i) / config.headDim);
      rope[p * half + i] = Math.cos(angle);
      rope[config.seqLen * half + p * half + i] = Math.sin(angle);
    }
  }
  const parts: Record<Tensor, Float32Array> = {
    tokenEmbedding: weights.tokenEmbedding,
    attnNorm: concat((l) => l.attnNorm),
    wq: concat((l) => l.wq),
    wk: concat((l) => l.wk),
    wv: concat((l) => l.wv),
    wo: concat((l) => l.wo),
    ffnNorm: concat((l) => l.ffnNorm),
    wGate: concat((l) => l.wGate),
    wUp: concat((l) => l.wUp),
    wDown: concat((l) => l.wDown),
    finalNorm: weights.finalNorm,
    ropeTables: rope,
    classifier: config.sharedClassifier ? new Float32Array(0) : weights.classifier,
  };
  let pos = 0;
  for (const name of LEGACY_ORDER) {
    flat.set(parts[name], pos);
    pos += parts[name].length;
  }
  return out;
}

/** Serialises a vocabulary as a legacy `tokenizer.bin` (U+2581 written back as spaces). */
export function writeLegacyTokenizer(vocab: Vocabulary): Uint8Array {
  const encoder = new TextEncoder();
  const encoded = vocab.pieces.map((p) => encoder.encode(p.replaceAll(SPACE_MARK, " ")));
  const size = 4 + encoded.reduce((s, b) => s + 8 + b.length, 0);
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  view.setInt32(0, encoded.reduce((m, b) => Math.max(m, b.length), 0), true);
  let pos = 4;
  encoded.forEach((b, i) => {
    view.setFloat32(pos, vocab.scores[i], true);
    view.setInt32(pos + 4, b.length, true);
    out.set(b, pos + 8);
    pos += 8 + b.length;
  });
  return out;
}
