/**
 * WebGPU error scopes and device-loss tracking, turned into {@linkcode TurboQuantError}.
 *
 * @module
 */

import { TurboQuantError } from "../errors.ts";

interface DeviceRecord {
  lost: GPUDeviceLostInfo | null;
  /** Resolves (never rejects) when the device is lost. */
  lostPromise: Promise<GPUDeviceLostInfo>;
}

const records = new WeakMap<GPUDevice, DeviceRecord>();

/** Starts watching `device.lost` (idempotent) so callers can reject promptly afterwards. */
export function trackDevice(device: GPUDevice): void {
  if (records.has(device)) return;
  const record: DeviceRecord = {
    lost: null,
    lostPromise: device.lost.then((info) => {
      record.lost = info;
      return info;
    }),
  };
  records.set(device, record);
}

/** The loss info once the device was lost, else null. */
export function deviceLostInfo(device: GPUDevice): GPUDeviceLostInfo | null {
  trackDevice(device);
  return records.get(device)!.lost;
}

/** Throws `"device-lost"` when `device.lost` has resolved. */
export function checkDeviceAlive(device: GPUDevice, what: string): void {
  const info = deviceLostInfo(device);
  if (info) {
    throw new TurboQuantError(
      "device-lost",
      `${what}: the GPU device was lost (${info.reason}: ${info.message || "no message"})`,
    );
  }
}

/**
 * Awaits GPU work (`mapAsync`, `onSubmittedWorkDone`) but rejects with `"device-lost"` as soon
 * as the device is lost, since such promises may otherwise never settle.
 */
export async function awaitGpu<T>(device: GPUDevice, what: string, work: Promise<T>): Promise<T> {
  trackDevice(device);
  const lost = records.get(device)!.lostPromise.then((info): never => {
    throw new TurboQuantError(
      "device-lost",
      `${what}: the GPU device was lost (${info.reason}: ${info.message || "no message"})`,
    );
  });
  // When the work wins the race, a later loss must not become an unhandled rejection.
  lost.catch(() => {});
  try {
    return await Promise.race([work, lost]);
  } catch (e) {
    if (e instanceof TurboQuantError) throw e;
    checkDeviceAlive(device, what);
    throw new TurboQuantError("gpu-validation", `${what}: ${(e as Error).message}`, { cause: e });
  }
}

/** Converts a popped WebGPU error into a TurboQuantError (null when there was none). */
export function toTurboQuantError(what: string, error: GPUError | null): TurboQuantError | null {
  if (!error) return null;
  if (error instanceof GPUOutOfMemoryError) {
    return new TurboQuantError("out-of-memory", `${what}: GPU out of memory: ${error.message}`);
  }
  return new TurboQuantError("gpu-validation", `${what}: WebGPU error: ${error.message}`);
}

/**
 * Runs `fn` synchronously inside "validation" and "out-of-memory" error scopes and throws the
 * first error as a TurboQuantError. `fn` must not await: scopes are a per-device stack, and an
 * await between push and pop would let concurrent operations pop each other's scopes.
 */
export async function withErrorScopes<T>(device: GPUDevice, what: string, fn: () => T): Promise<T> {
  device.pushErrorScope("validation");
  device.pushErrorScope("out-of-memory");
  let result: T;
  let thrown: unknown = undefined;
  let failed = false;
  try {
    result = fn();
  } catch (e) {
    failed = true;
    thrown = e;
  }
  const oom = device.popErrorScope();
  const validation = device.popErrorScope();
  const [oomError, validationError] = await Promise.all([oom, validation]);
  if (failed) throw thrown;
  const error = toTurboQuantError(what, oomError) ?? toTurboQuantError(what, validationError);
  if (error) {
    checkDeviceAlive(device, what);
    throw error;
  }
  return result!;
}
