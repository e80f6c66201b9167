/**
 * Compute pipelines cached per device, keyed by label, WGSL code and override constants, so
 * each shader is compiled once per device (first compiles take seconds on software adapters).
 *
 * @module
 */

import { COMMON_WGSL } from "../_shaders/_common.ts";
import { TurboQuantError } from "../errors.ts";
import { checkDeviceAlive, toTurboQuantError } from "./_errors.ts";

/** What identifies one compute pipeline. */
export interface PipelineSpec {
  /** GPU object label, `turboquant/<what>`. */
  label: string;
  /** Full WGSL source (shared helpers already concatenated). */
  code: string;
  /** Entry point; default `"main"`. */
  entryPoint?: string;
  /** Pipeline-overridable constants. */
  constants?: Record<string, number>;
}

const caches = new WeakMap<GPUDevice, Map<string, Promise<GPUComputePipeline>>>();

function keyOf(spec: PipelineSpec): string {
  const constants = spec.constants
    ? Object.keys(spec.constants).sort().map((k) => `${k}=${spec.constants![k]}`).join(",")
    : "";
  return `${spec.label}\u0000${spec.entryPoint ?? "main"}\u0000${constants}\u0000${spec.code}`;
}

async function create(device: GPUDevice, spec: PipelineSpec): Promise<GPUComputePipeline> {
  // Shader compile errors only reach error scopes (the pipeline error says "invalid module").
  device.pushErrorScope("validation");
  device.pushErrorScope("out-of-memory");
  const module = device.createShaderModule({ label: spec.label, code: spec.code });
  const pipelinePromise = device.createComputePipelineAsync({
    label: spec.label,
    layout: "auto",
    compute: { module, entryPoint: spec.entryPoint ?? "main", constants: spec.constants },
  });
  const oom = device.popErrorScope();
  const validation = device.popErrorScope();
  let pipeline: GPUComputePipeline | null = null;
  let pipelineError: unknown = null;
  try {
    pipeline = await pipelinePromise;
  } catch (e) {
    pipelineError = e;
  }
  const scoped = toTurboQuantError(`compiling ${spec.label}`, await oom) ??
    toTurboQuantError(`compiling ${spec.label}`, await validation);
  if (scoped) throw scoped;
  if (pipelineError || !pipeline) {
    checkDeviceAlive(device, `compiling ${spec.label}`);
    throw new TurboQuantError(
      "gpu-validation",
      `compiling ${spec.label}: ${(pipelineError as Error | null)?.message ?? "no pipeline"}`,
      { cause: pipelineError },
    );
  }
  return pipeline;
}

/**
 * The cached pipeline for `spec` on `device`, compiling it on first use. A failed compile is
 * not cached (the next call retries and reports again).
 */
export function getPipeline(device: GPUDevice, spec: PipelineSpec): Promise<GPUComputePipeline> {
  let cache = caches.get(device);
  if (!cache) {
    cache = new Map();
    caches.set(device, cache);
  }
  const key = keyOf(spec);
  let pipeline = cache.get(key);
  if (!pipeline) {
    pipeline = create(device, spec);
    cache.set(key, pipeline);
    pipeline.catch(() => cache.delete(key));
  }
  return pipeline;
}

/** Number of pipelines cached for `device` (for tests). */
export function cachedPipelineCount(device: GPUDevice): number {
  return caches.get(device)?.size ?? 0;
}

/**
 * Expands the host directives of WGSL templates:
 *
 * ```wgsl
 * //#unroll r QB
 * acc[{r}] += p[{r}] * v;
 * //#end
 * //#if F16
 * ...
 * //#else
 * ...
 * //#end
 * ```
 *
 * `//#unroll NAME COUNT` repeats its lines COUNT times (a number or a name in `constants`),
 * replacing `{NAME}` with `0u`, `1u`, ...; `//#if NAME` keeps one branch by the truth of
 * `constants[NAME]`. Blocks nest. Why: on software adapters a private array indexed by a loop
 * variable lives in memory with per-lane loads while constant indices keep it in registers,
 * Mesa does not unroll every loop, and a dead branch with constant out-of-range indices does
 * not validate.
 */
export function expandDirectives(
  code: string,
  constants: Record<string, number | boolean>,
): string {
  const lines = code.split("\n");
  const open = /^\s*\/\/#(unroll|if)\s/;
  const isEnd = (l: string): boolean => /^\s*\/\/#end\s*$/.test(l);
  const isElse = (l: string): boolean => /^\s*\/\/#else\s*$/.test(l);
  const bad = (msg: string): never => {
    throw new TurboQuantError("invalid-argument", `WGSL template: ${msg}`);
  };
  /** Index of the //#end closing the block opened at `i`, and of its //#else (or -1). */
  const close = (i: number, to: number): [number, number] => {
    let depth = 1;
    let elseAt = -1;
    for (let j = i + 1; j < to; j++) {
      if (open.test(lines[j])) depth++;
      else if (isElse(lines[j]) && depth === 1) elseAt = j;
      else if (isEnd(lines[j]) && --depth === 0) return [j, elseAt];
    }
    return bad(`directive at line ${i + 1} has no //#end`);
  };
  const expand = (from: number, to: number, vars: Record<string, number>, into: string[]): void => {
    for (let i = from; i < to; i++) {
      const unroll = /^\s*\/\/#unroll\s+(\w+)\s+(\w+)\s*$/.exec(lines[i]);
      const cond = /^\s*\/\/#if\s+(\w+)\s*$/.exec(lines[i]);
      if (unroll) {
        const [end, elseAt] = close(i, to);
        if (elseAt >= 0) bad(`//#else inside //#unroll at line ${elseAt + 1}`);
        const name = unroll[2];
        const count = /^\d+$/.test(name) ? Number(name) : constants[name];
        if (typeof count !== "number" || !Number.isInteger(count) || count < 0) {
          bad(`//#unroll ${unroll[1]} ${name}: count ${count} is not a non-negative integer`);
        }
        for (let k = 0; k < (count as number); k++) {
          expand(i + 1, end, { ...vars, [unroll[1]]: k }, into);
        }
        i = end;
      } else if (cond) {
        const [end, elseAt] = close(i, to);
        if (!(cond[1] in constants)) bad(`//#if ${cond[1]}: unknown constant`);
        const truth = Boolean(constants[cond[1]]);
        if (truth) expand(i + 1, elseAt >= 0 ? elseAt : end, vars, into);
        else if (elseAt >= 0) expand(elseAt + 1, end, vars, into);
        i = end;
      } else if (isEnd(lines[i]) || isElse(lines[i])) {
        bad(`unbalanced ${lines[i].trim()} at line ${i + 1}`);
      } else {
        let line = lines[i];
        for (const [name, value] of Object.entries(vars)) {
          line = line.replaceAll(`{${name}}`, `${value}u`);
        }
        into.push(line);
      }
    }
  };
  const out: string[] = [];
  expand(0, lines.length, {}, out);
  return out.join("\n");
}

/**
 * Builds a kernel's WGSL: `const NAME: type = value;` lines (compile-time constants that size
 * workgroup arrays and let loops unroll, which override constants cannot do everywhere), then
 * the shared helpers of `shaders/_common.wgsl`, then `sources` in order, with `//#unroll` and
 * `//#if` blocks expanded (see {@linkcode expandDirectives}).
 */
export function composeShader(
  constants: Record<string, number | boolean>,
  ...sources: string[]
): string {
  const lines = Object.entries(constants).map(([name, value]) =>
    typeof value === "boolean"
      ? `const ${name}: bool = ${value};`
      : Number.isInteger(value) && value >= 0
      ? `const ${name}: u32 = ${value}u;`
      : `const ${name}: f32 = ${value};`
  );
  return expandDirectives([lines.join("\n"), COMMON_WGSL, ...sources].join("\n"), constants);
}
