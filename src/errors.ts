/**
 * The one error type of the library.
 *
 * @module
 */

/** Machine-readable reason of a {@linkcode TurboQuantError}. */
export type TurboQuantErrorCode =
  | "invalid-argument"
  | "invalid-state"
  | "out-of-memory"
  | "no-adapter"
  | "gpu-validation"
  | "device-lost"
  | "destroyed";

/**
 * Every rejected input or state of the library is reported as a `TurboQuantError`.
 * The message names the argument and the value; `code` says what kind of failure it is.
 *
 * @example Catch a bad argument
 * ```ts
 * import { TurboQuantCodec, TurboQuantError } from "@turboquant/turboquant";
 * try {
 *   new TurboQuantCodec({ headDim: 7, bits: 3 });
 * } catch (e) {
 *   if (e instanceof TurboQuantError) console.log(e.code, e.message);
 * }
 * ```
 */
export class TurboQuantError extends Error {
  /** What kind of failure this is. */
  readonly code: TurboQuantErrorCode;

  /**
   * Creates the error.
   *
   * @param code What kind of failure this is.
   * @param message Names the argument or state and the offending value.
   * @param options Standard error options (`cause`).
   */
  constructor(code: TurboQuantErrorCode, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "TurboQuantError";
    this.code = code;
  }
}

/** Throws an `invalid-argument` error unless `ok`. */
export function check(ok: boolean, message: string): asserts ok {
  if (!ok) throw new TurboQuantError("invalid-argument", message);
}

/** A short description of a rejected value for error messages: `Float32Array(10)`, `"f64"`. */
export function describe(x: unknown): string {
  if (ArrayBuffer.isView(x)) return `${x.constructor.name}(${(x as Uint8Array).length})`;
  if (Array.isArray(x)) return `Array(${x.length})`;
  if (typeof x === "string") return JSON.stringify(x);
  return String(x);
}
