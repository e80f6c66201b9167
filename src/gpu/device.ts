/**
 * Requesting a WebGPU device with the limits and features the library needs.
 *
 * @module
 */

import { TurboQuantError } from "../errors.ts";
import { trackDevice } from "./_errors.ts";

/** Options of {@linkcode requestTurboQuantDevice}. */
export interface DeviceOptions {
  /** Adapter preference; default `"high-performance"`. */
  powerPreference?: GPUPowerPreference;
  /** Request `"timestamp-query"` when the adapter has it (default true). */
  timestamps?: boolean;
  /** Request `"shader-f16"` when the adapter has it (default true). */
  shaderF16?: boolean;
  /** Device label; default `"turboquant/device"`. */
  label?: string;
}

/** What {@linkcode describeAdapter} reports about the adapter behind a device. */
export interface AdapterDescription {
  /** Human-readable adapter description (e.g. `"llvmpipe (LLVM 15.0.6, 256 bits)"`). */
  description: string;
  /** Vendor id or name as the implementation reports it. */
  vendor: string;
  /** Architecture as the implementation reports it (often empty). */
  architecture: string;
  /** Whether the adapter is a software/fallback adapter. */
  isFallbackAdapter: boolean;
  /** Features enabled on the device, sorted. */
  features: string[];
  /** The limits the library cares about, as granted on the device. */
  limits: Record<string, number>;
}

/** Limits requested at the adapter's maximum: big buffers, many storage bindings, big workgroups. */
const REQUESTED_LIMITS = [
  "maxBufferSize",
  "maxStorageBufferBindingSize",
  "maxStorageBuffersPerShaderStage",
  "maxUniformBufferBindingSize",
  "maxComputeWorkgroupStorageSize",
  "maxComputeInvocationsPerWorkgroup",
  "maxComputeWorkgroupSizeX",
  "maxComputeWorkgroupSizeY",
  "maxComputeWorkgroupSizeZ",
  "maxComputeWorkgroupsPerDimension",
  "maxBindGroups",
  "maxBindingsPerBindGroup",
] as const;

const adapterInfos = new WeakMap<GPUDevice, AdapterDescription>();

/**
 * Requests a WebGPU device for TurboQuant: the adapter's maximum buffer, binding and workgroup
 * limits, plus `"shader-f16"` and `"timestamp-query"` where the adapter has them.
 *
 * @throws {TurboQuantError} `"no-adapter"` when `navigator.gpu` or an adapter is missing.
 *
 * @example Request a device and print what it runs on
 * ```ts
 * import { describeAdapter, requestTurboQuantDevice } from "@turboquant/turboquant";
 * const device = await requestTurboQuantDevice();
 * console.log(describeAdapter(device).description);
 * device.destroy();
 * ```
 */
export async function requestTurboQuantDevice(options: DeviceOptions = {}): Promise<GPUDevice> {
  const gpu = (globalThis.navigator as Navigator | undefined)?.gpu;
  if (!gpu) {
    throw new TurboQuantError(
      "no-adapter",
      "navigator.gpu is undefined: this runtime has no WebGPU",
    );
  }
  let adapter: GPUAdapter | null;
  try {
    adapter = await gpu.requestAdapter({
      powerPreference: options.powerPreference ?? "high-performance",
    });
  } catch (e) {
    throw new TurboQuantError("no-adapter", `requestAdapter failed: ${(e as Error).message}`, {
      cause: e,
    });
  }
  if (!adapter) {
    throw new TurboQuantError("no-adapter", "navigator.gpu.requestAdapter() returned null");
  }
  const requiredLimits: Record<string, number> = {};
  const adapterLimits = adapter.limits as unknown as Record<string, number>;
  for (const name of REQUESTED_LIMITS) {
    const value = adapterLimits[name];
    if (typeof value === "number") requiredLimits[name] = value;
  }
  const requiredFeatures: GPUFeatureName[] = [];
  if ((options.shaderF16 ?? true) && adapter.features.has("shader-f16")) {
    requiredFeatures.push("shader-f16");
  }
  if ((options.timestamps ?? true) && adapter.features.has("timestamp-query")) {
    requiredFeatures.push("timestamp-query");
  }
  let device: GPUDevice;
  try {
    device = await adapter.requestDevice({
      label: options.label ?? "turboquant/device",
      requiredFeatures,
      requiredLimits,
    });
  } catch (e) {
    throw new TurboQuantError("no-adapter", `requestDevice failed: ${(e as Error).message}`, {
      cause: e,
    });
  }
  trackDevice(device);
  const info = adapter.info;
  const limits: Record<string, number> = {};
  const deviceLimits = device.limits as unknown as Record<string, number>;
  for (const name of [...REQUESTED_LIMITS, "minStorageBufferOffsetAlignment"]) {
    limits[name] = deviceLimits[name];
  }
  adapterInfos.set(device, {
    description: info.description || info.device || "unknown adapter",
    vendor: info.vendor,
    architecture: info.architecture,
    isFallbackAdapter: (info as { isFallbackAdapter?: boolean }).isFallbackAdapter ?? false,
    features: [...device.features].sort(),
    limits,
  });
  return device;
}

/**
 * Describes the adapter behind a device made by {@linkcode requestTurboQuantDevice} (for
 * printing beside benchmark figures). Devices made elsewhere get what the device itself knows.
 *
 * @example Print the adapter
 * ```ts
 * import { describeAdapter, requestTurboQuantDevice } from "@turboquant/turboquant";
 * const device = await requestTurboQuantDevice();
 * const { description, features } = describeAdapter(device);
 * console.log(description, features.join(", "));
 * device.destroy();
 * ```
 */
export function describeAdapter(device: GPUDevice): AdapterDescription {
  const known = adapterInfos.get(device);
  if (known) return known;
  const limits: Record<string, number> = {};
  const deviceLimits = device.limits as unknown as Record<string, number>;
  for (const name of [...REQUESTED_LIMITS, "minStorageBufferOffsetAlignment"]) {
    limits[name] = deviceLimits[name];
  }
  const info = (device as { adapterInfo?: GPUAdapterInfo }).adapterInfo;
  return {
    description: info?.description || "unknown adapter",
    vendor: info?.vendor ?? "",
    architecture: info?.architecture ?? "",
    isFallbackAdapter: false,
    features: [...device.features].sort(),
    limits,
  };
}

/**
 * Whether the device runs on a CPU (llvmpipe, lavapipe, SwiftShader, WARP): kernels then
 * prefer one 8-lane SIMD batch per workgroup, since lanes of a workgroup run one after another.
 */
export function isSoftwareDevice(device: GPUDevice): boolean {
  const d = describeAdapter(device);
  return d.isFallbackAdapter ||
    /llvmpipe|lavapipe|swiftshader|softpipe|warp|software/i.test(`${d.description} ${d.vendor}`);
}
