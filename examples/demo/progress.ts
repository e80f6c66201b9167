/**
 * Progress lines on stderr, stamped with the seconds since the demo started, so that stdout
 * holds only the results.
 *
 * @module
 */

/** Writes progress lines; `elapsed()` is the time since creation in seconds. */
export interface Progress {
  /** Writes `[  1.2s] message` to stderr. */
  log(message: string): void;
  /** Seconds since the reporter was created. */
  elapsed(): number;
}

/**
 * A progress reporter; `write` defaults to stderr (replace it in tests). Times count from
 * `start` (a `performance.now()` value; 0 is the start of the process, module loading and
 * npm downloads included). Default: now.
 */
export function createProgress(
  write: (line: string) => void = (line) => console.error(line),
  start: number = performance.now(),
): Progress {
  const elapsed = () => (performance.now() - start) / 1000;
  return {
    log: (message) => write(`[${elapsed().toFixed(1).padStart(5)}s] ${message}`),
    elapsed,
  };
}
