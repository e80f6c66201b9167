/**
 * Buffer helpers: labelled creation, upload, readback, and timestamp queries for benchmarks.
 *
 * @module
 */

import { TurboQuantError } from "../errors.ts";
import { awaitGpu } from "./_errors.ts";

/** Usage of buffers that kernels read and write and that can be copied both ways. */
export const STORAGE_USAGE: number = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC |
  GPUBufferUsage.COPY_DST;

/** Rows `first .. first + count` of a token-major buffer, bound for one dispatch. */
export interface RowWindow {
  /** Binding at an offset aligned to minStorageBufferOffsetAlignment. */
  binding: GPUBufferBinding;
  /** Word offset of row `first` inside the binding. */
  wordOffset: number;
}

/** Binds rows `first .. first + count` (each `rowWords` u32 words) of `buffer`. */
export function rowWindow(
  device: GPUDevice,
  buffer: GPUBuffer,
  rowWords: number,
  first: number,
  count: number,
): RowWindow {
  const start = first * rowWords * 4;
  const offset = start - (start % device.limits.minStorageBufferOffsetAlignment);
  const end = Math.min(start + count * rowWords * 4, buffer.size);
  const size = Math.min(Math.max(end - offset, 16), buffer.size - offset);
  return { binding: { buffer, offset, size }, wordOffset: (start - offset) / 4 };
}

/** Rounds `n` up to a multiple of `m`. */
export function roundUp(n: number, m: number): number {
  return Math.ceil(n / m) * m;
}

/** Creates a labelled buffer (size rounded up to 4 bytes, at least 4), optionally filled. */
export function createBuffer(
  device: GPUDevice,
  label: string,
  size: number,
  usage: number = STORAGE_USAGE,
  data?: ArrayBufferView,
): GPUBuffer {
  const byteSize = Math.max(4, roundUp(size, 4));
  if (data && data.byteLength > byteSize) {
    throw new TurboQuantError(
      "invalid-argument",
      `createBuffer ${label}: data of ${data.byteLength} bytes exceeds size ${byteSize}`,
    );
  }
  const buffer = device.createBuffer({
    label,
    size: byteSize,
    usage,
    mappedAtCreation: data !== undefined,
  });
  if (data) {
    new Uint8Array(buffer.getMappedRange()).set(
      new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
    );
    buffer.unmap();
  }
  return buffer;
}

/** Writes `data` at `offset` of `buffer` through the queue (the data is copied at once). */
export function upload(
  device: GPUDevice,
  buffer: GPUBuffer,
  data: ArrayBufferView<ArrayBuffer>,
  offset = 0,
): void {
  const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  // writeBuffer wants a multiple of 4 bytes.
  if (bytes.byteLength % 4 !== 0) {
    const padded = new Uint8Array(roundUp(bytes.byteLength, 4));
    padded.set(bytes);
    device.queue.writeBuffer(buffer, offset, padded);
  } else {
    device.queue.writeBuffer(buffer, offset, bytes);
  }
}

/** A MAP_READ staging buffer that received a copy in `encoder`; `read()` maps it after submit. */
export interface PendingRead {
  /** Resolves to the bytes after the encoder was submitted; destroys the staging buffer. */
  read(): Promise<ArrayBuffer>;
  /** Destroys the staging buffer without reading (on failure paths). */
  discard(): void;
}

/** Records a copy of `size` bytes at `offset` of `source` into a new staging buffer. */
export function encodeRead(
  device: GPUDevice,
  encoder: GPUCommandEncoder,
  source: GPUBuffer,
  offset: number,
  size: number,
  label = "turboquant/readback",
): PendingRead {
  const staging = device.createBuffer({
    label,
    size: Math.max(4, roundUp(size, 4)),
    usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
  });
  encoder.copyBufferToBuffer(source, offset, staging, 0, roundUp(size, 4));
  return {
    async read(): Promise<ArrayBuffer> {
      try {
        await awaitGpu(device, label, staging.mapAsync(GPUMapMode.READ));
        return staging.getMappedRange().slice(0, size);
      } finally {
        staging.destroy();
      }
    },
    discard(): void {
      staging.destroy();
    },
  };
}

/** Copies `size` bytes at `offset` of `source` back to the CPU (submits its own encoder). */
export async function readBuffer(
  device: GPUDevice,
  source: GPUBuffer,
  offset = 0,
  size: number = source.size - offset,
): Promise<ArrayBuffer> {
  const encoder = device.createCommandEncoder({ label: "turboquant/readback" });
  const pending = encodeRead(device, encoder, source, offset, size);
  device.queue.submit([encoder.finish()]);
  return await pending.read();
}

/**
 * GPU time of compute passes from timestamp queries. `passTimestamps()` gives the
 * `timestampWrites` of one pass; after the passes, `resolve(encoder)`, submit, then
 * `readMs()` returns each pass's duration in milliseconds. Without the "timestamp-query"
 * feature everything is a no-op and `readMs()` returns null.
 */
export class GpuTimer {
  readonly enabled: boolean;
  readonly #device: GPUDevice;
  readonly #capacity: number;
  #querySet: GPUQuerySet | null = null;
  #used = 0;
  #pending: PendingRead | null = null;
  #resolveBuffer: GPUBuffer | null = null;

  constructor(device: GPUDevice, maxPasses = 16) {
    this.#device = device;
    this.#capacity = maxPasses;
    this.enabled = device.features.has("timestamp-query");
    if (this.enabled) {
      this.#querySet = device.createQuerySet({
        label: "turboquant/timestamps",
        type: "timestamp",
        count: 2 * maxPasses,
      });
    }
  }

  /** Timestamp writes for the next pass (undefined when disabled or out of slots). */
  passTimestamps(): GPUComputePassTimestampWrites | undefined {
    if (!this.#querySet || this.#used >= this.#capacity) return undefined;
    const i = this.#used++;
    return {
      querySet: this.#querySet,
      beginningOfPassWriteIndex: 2 * i,
      endOfPassWriteIndex: 2 * i + 1,
    };
  }

  /** Records the resolve and readback copy; call once, after the timed passes. */
  resolve(encoder: GPUCommandEncoder): void {
    if (!this.#querySet || this.#used === 0) return;
    const bytes = 16 * this.#used;
    const resolveBuffer = this.#device.createBuffer({
      label: "turboquant/timestamps-resolve",
      size: bytes,
      usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
    });
    encoder.resolveQuerySet(this.#querySet, 0, 2 * this.#used, resolveBuffer, 0);
    this.#pending = encodeRead(this.#device, encoder, resolveBuffer, 0, bytes);
    // Destroying before submit would invalidate the encoder: free it once read.
    this.#resolveBuffer = resolveBuffer;
  }

  /** Durations (ms) of the timed passes in order, or null when disabled. */
  async readMs(): Promise<number[] | null> {
    if (!this.#pending) return null;
    const pending = this.#pending;
    this.#pending = null;
    let stamps: BigUint64Array;
    try {
      stamps = new BigUint64Array(await pending.read());
    } finally {
      this.#resolveBuffer?.destroy();
      this.#resolveBuffer = null;
    }
    const out: number[] = [];
    for (let i = 0; i + 1 < stamps.length; i += 2) {
      out.push(Number(stamps[i + 1] - stamps[i]) / 1e6);
    }
    return out;
  }

  /** Frees the query set. */
  destroy(): void {
    this.#pending?.discard();
    this.#pending = null;
    this.#resolveBuffer?.destroy();
    this.#resolveBuffer = null;
    this.#querySet?.destroy();
    this.#querySet = null;
  }
}
