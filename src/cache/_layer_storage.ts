/**
 * One layer's cache storage: named GPU buffers in token-major layout ([token][head][...]),
 * a length and a capacity (in tokens), and the growth policy.
 *
 * @module
 */

import { TurboQuantError } from "../errors.ts";

/** One per-token buffer of a cache: `bytesPerToken` is a multiple of 4 (WebGPU copy rule). */
export interface TokenBufferSpec {
  /** Buffer name, unique within the cache (e.g. `"k"`, `"kIndices"`). */
  readonly name: string;
  /** Bytes one token occupies in this buffer, all KV heads together; a multiple of 4. */
  readonly bytesPerToken: number;
}

/**
 * A range of tokens whose buffers are bound as one binding each: starts at a multiple of 256
 * tokens (so every offset is aligned) and spans at most the binding size limit.
 */
export interface StorageWindow {
  /** Absolute token index of the binding's first token. */
  readonly start: number;
  /** Tokens covered by the binding. */
  readonly tokens: number;
  /** Bind-group resource of buffer `name` for this window. */
  binding(name: string): GPUBufferBinding;
}

/** Window starts are multiples of this many tokens: 256 * 4 bytes covers any offset alignment. */
export const WINDOW_ALIGN_TOKENS = 256;

/**
 * Capacity after growing to hold `needed` tokens: needed + max(floor(needed / 4), 128),
 * clamped to `maxTokens` (the caller has checked needed <= maxTokens).
 */
export function grownCapacity(needed: number, maxTokens: number): number {
  return Math.min(needed + Math.max(Math.floor(needed / 4), 128), maxTokens);
}

/** A layer's buffers, length and capacity. */
export class LayerStorage {
  /** Layer index. */
  readonly layer: number;
  /** Per-token buffers, in order. */
  readonly specs: readonly TokenBufferSpec[];
  /** Tokens stored (visible to reads). */
  length = 0;
  /** Bumped whenever the buffers are replaced, so anything bound to them is rebuilt. */
  generation = 0;
  #capacity = 0;
  #buffers: Map<string, GPUBuffer> | null = null;
  #bindGroups = new Map<string, GPUBindGroup>();
  readonly #label: string;

  /** An empty storage (no buffers) for `layer`; `label` prefixes its buffers' labels. */
  constructor(layer: number, specs: readonly TokenBufferSpec[], label: string) {
    this.layer = layer;
    this.specs = specs;
    this.#label = label;
  }

  /** Tokens the buffers can hold (0 when none are allocated). */
  get capacity(): number {
    return this.#capacity;
  }

  /** Whether buffers exist. */
  get allocated(): boolean {
    return this.#buffers !== null;
  }

  /** Bytes per token over all buffers. */
  get bytesPerToken(): number {
    return this.specs.reduce((n, s) => n + s.bytesPerToken, 0);
  }

  /** Persistent GPU bytes of this layer. */
  get bytes(): number {
    return this.#capacity * this.bytesPerToken;
  }

  /** Buffer `name` (throws `"invalid-state"` when not allocated). */
  buffer(name: string): GPUBuffer {
    const b = this.#buffers?.get(name);
    if (!b) {
      throw new TurboQuantError(
        "invalid-state",
        `layer ${this.layer}: buffer "${name}" is not allocated (capacity ${this.#capacity})`,
      );
    }
    return b;
  }

  /** Bytes per token of buffer `name`. */
  bytesPerTokenOf(name: string): number {
    const spec = this.specs.find((s) => s.name === name);
    if (!spec) throw new TurboQuantError("invalid-argument", `no buffer named "${name}"`);
    return spec.bytesPerToken;
  }

  /** All buffers by name (empty when not allocated). */
  buffers(): ReadonlyMap<string, GPUBuffer> {
    return this.#buffers ?? new Map();
  }

  /**
   * Creates buffers for `capacity` tokens (usage STORAGE | COPY_SRC | COPY_DST). Returns them
   * without installing; `install` swaps them in.
   */
  createBuffers(device: GPUDevice, capacity: number): Map<string, GPUBuffer> {
    const out = new Map<string, GPUBuffer>();
    for (const spec of this.specs) {
      out.set(
        spec.name,
        device.createBuffer({
          label: `${this.#label}/layer${this.layer}/${spec.name}`,
          size: capacity * spec.bytesPerToken,
          usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
        }),
      );
    }
    return out;
  }

  /** Records copies of the first `tokens` tokens of every current buffer into `next`. */
  encodeCopyTo(encoder: GPUCommandEncoder, next: Map<string, GPUBuffer>, tokens: number): void {
    if (!this.#buffers || tokens === 0) return;
    for (const spec of this.specs) {
      encoder.copyBufferToBuffer(
        this.#buffers.get(spec.name)!,
        0,
        next.get(spec.name)!,
        0,
        tokens * spec.bytesPerToken,
      );
    }
  }

  /** Installs new buffers of `capacity` tokens; returns the old ones (caller destroys them). */
  install(next: Map<string, GPUBuffer> | null, capacity: number): Map<string, GPUBuffer> | null {
    const old = this.#buffers;
    this.#buffers = next;
    this.#capacity = next ? capacity : 0;
    this.generation++;
    this.#bindGroups.clear();
    return old;
  }

  /** Destroys the buffers (capacity and length become 0). */
  release(): void {
    const old = this.install(null, 0);
    this.length = 0;
    if (old) { for (const b of old.values()) b.destroy(); }
  }

  /**
   * A bind group cached for the current buffer generation under `key`; `make` builds it on a
   * miss. Keys must name every other resource the group binds.
   */
  bindGroup(key: string, make: () => GPUBindGroup): GPUBindGroup {
    let group = this.#bindGroups.get(key);
    if (!group) {
      if (this.#bindGroups.size >= 256) this.#bindGroups.clear();
      group = make();
      this.#bindGroups.set(key, group);
    }
    return group;
  }

  /** The window that starts at `start` (a multiple of 256) and covers `tokens` tokens. */
  window(start: number, tokens: number): StorageWindow {
    const buffers = this.#buffers;
    const specs = this.specs;
    const layer = this.layer;
    return {
      start,
      tokens,
      binding(name: string): GPUBufferBinding {
        const spec = specs.find((s) => s.name === name);
        const buffer = buffers?.get(name);
        if (!spec || !buffer) {
          throw new TurboQuantError(
            "invalid-state",
            `layer ${layer}: no allocated buffer "${name}"`,
          );
        }
        return { buffer, offset: start * spec.bytesPerToken, size: tokens * spec.bytesPerToken };
      },
    };
  }

  /**
   * Windows covering tokens [from, to): starts at multiples of `maxTokens` (itself a multiple
   * of 256), each binding ending at min(next boundary, to).
   */
  windows(from: number, to: number, maxTokens: number): StorageWindow[] {
    const out: StorageWindow[] = [];
    let start = Math.floor(from / maxTokens) * maxTokens;
    while (start < to) {
      const end = Math.min(start + maxTokens, to);
      out.push(this.window(start, end - start));
      start += maxTokens;
    }
    return out;
  }
}
