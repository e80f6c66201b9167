/**
 * Packing of a kernel's uniform struct. Every kernel has one uniform struct made of 4-byte
 * scalars (u32, i32, f32) in declaration order, so field i sits at byte 4 * i; the size is
 * rounded up to 16 bytes as WGSL's uniform layout requires.
 *
 * @module
 */

import { TurboQuantError } from "../errors.ts";

/** Scalar field types of a uniform struct. */
export type UniformFieldType = "u32" | "i32" | "f32";

/** A uniform struct layout: pack values by field name. */
export interface UniformLayout<F extends Record<string, UniformFieldType>> {
  /** Field names in WGSL declaration order. */
  readonly fields: readonly (keyof F & string)[];
  /** Byte size (a multiple of 16). */
  readonly size: number;
  /** Packs one struct value; every field must be given. */
  pack(values: { [K in keyof F]: number }): Uint8Array<ArrayBuffer>;
}

/**
 * Defines a uniform struct layout. The object's key order must match the WGSL struct.
 *
 * ```ts
 * const PARAMS = uniformLayout({ n: "u32", scale: "f32" });
 * device.queue.writeBuffer(buffer, 0, PARAMS.pack({ n: 10, scale: 0.5 }));
 * ```
 */
export function uniformLayout<const F extends Record<string, UniformFieldType>>(
  fields: F,
): UniformLayout<F> {
  const names = Object.keys(fields) as (keyof F & string)[];
  const size = Math.max(16, Math.ceil((names.length * 4) / 16) * 16);
  return {
    fields: names,
    size,
    pack(values: { [K in keyof F]: number }): Uint8Array<ArrayBuffer> {
      const bytes = new Uint8Array(size);
      const view = new DataView(bytes.buffer);
      names.forEach((name, i) => {
        const value = values[name];
        if (typeof value !== "number" || Number.isNaN(value)) {
          throw new TurboQuantError(
            "invalid-argument",
            `uniform field ${name} = ${value} is not a number`,
          );
        }
        const type = fields[name];
        if (type === "f32") view.setFloat32(i * 4, value, true);
        else if (type === "i32") view.setInt32(i * 4, value, true);
        else {
          if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) {
            throw new TurboQuantError(
              "invalid-argument",
              `uniform field ${name} = ${value} is not a u32`,
            );
          }
          view.setUint32(i * 4, value, true);
        }
      });
      return bytes;
    },
  };
}

/**
 * Uniform structs of one operation, packed into few buffers at offsets aligned to
 * `minUniformBufferOffsetAlignment`. `slot()` returns a binding at once (the block buffer is
 * written while mapped at creation); `finish()` unmaps before the commands are submitted.
 */
export class UniformArena {
  readonly #device: GPUDevice;
  readonly #label: string;
  readonly #blocks: GPUBuffer[] = [];
  #mapped: Uint8Array | null = null;
  #used = 0;
  #blockSize = 0;

  constructor(device: GPUDevice, label: string) {
    this.#device = device;
    this.#label = label;
  }

  /** Adds one struct and returns its binding. */
  slot(bytes: Uint8Array): GPUBufferBinding {
    const align = this.#device.limits.minUniformBufferOffsetAlignment;
    const size = Math.ceil(bytes.byteLength / 16) * 16;
    let offset = Math.ceil(this.#used / align) * align;
    if (!this.#mapped || offset + size > this.#blockSize) {
      this.#unmap();
      this.#blockSize = Math.max(64 * align, Math.ceil(size / align) * align);
      const buffer = this.#device.createBuffer({
        label: this.#label,
        size: this.#blockSize,
        usage: GPUBufferUsage.UNIFORM,
        mappedAtCreation: true,
      });
      this.#blocks.push(buffer);
      this.#mapped = new Uint8Array(buffer.getMappedRange());
      offset = 0;
    }
    this.#mapped.set(bytes, offset);
    this.#used = offset + size;
    return { buffer: this.#blocks[this.#blocks.length - 1], offset, size };
  }

  #unmap(): void {
    if (this.#mapped) {
      this.#blocks[this.#blocks.length - 1].unmap();
      this.#mapped = null;
    }
  }

  /** Unmaps the last block; call before submitting commands that use the slots. */
  finish(): void {
    this.#unmap();
  }

  /** Destroys the buffers (after submit the free is deferred until the GPU is done). */
  destroy(): void {
    this.#mapped = null;
    for (const b of this.#blocks) b.destroy();
    this.#blocks.length = 0;
  }
}
