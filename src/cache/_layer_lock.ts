/**
 * A small FIFO async mutex: one per layer, so operations on a layer run one at a time while
 * different layers proceed concurrently.
 *
 * Why not `navigator.locks` or `npm:async-mutex`: Web Locks are named per origin (every cache
 * would need unique names, and the API is absent in some runtimes), and a dependency is not
 * worth twenty lines. A promise chain is FIFO, cannot deadlock on one lock, and keeps working
 * after a task throws.
 *
 * @module
 */

/** FIFO async mutex. */
export class AsyncLock {
  #tail: Promise<void> = Promise.resolve();
  #queued = 0;

  /** Tasks running or waiting. */
  get pending(): number {
    return this.#queued;
  }

  /** Runs `task` after every earlier task of this lock has settled. */
  run<T>(task: () => Promise<T> | T): Promise<T> {
    this.#queued++;
    const result = this.#tail.then(task);
    this.#tail = result.then(
      () => {
        this.#queued--;
      },
      () => {
        this.#queued--;
      },
    );
    return result;
  }
}

/** Runs `task` holding all `locks`, taken in array order (a fixed order cannot deadlock). */
export function runWithAll<T>(locks: readonly AsyncLock[], task: () => Promise<T> | T): Promise<T> {
  const step = (i: number): Promise<T> =>
    i === locks.length ? Promise.resolve().then(task) : locks[i].run(() => step(i + 1));
  return step(0);
}
