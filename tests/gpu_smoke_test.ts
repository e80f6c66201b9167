import assert from "node:assert/strict";
import { SMOKE_WGSL } from "../src/_shaders/smoke.ts";
import { describeAdapter, requestTurboQuantDevice } from "../src/gpu/device.ts";
import { createBuffer, GpuTimer, readBuffer } from "../src/gpu/_buffers.ts";
import { withErrorScopes } from "../src/gpu/_errors.ts";
import { cachedPipelineCount, composeShader, getPipeline } from "../src/gpu/_pipelines.ts";
import { uniformLayout } from "../src/gpu/_uniforms.ts";
import { TurboQuantError } from "../src/errors.ts";
import { gpuTest, Rng } from "./_helpers.ts";

const PARAMS = uniformLayout({ n: "u32", groups_x: "u32", scale: "f32" });

gpuTest("device: limits and features requested", ({ device }) => {
  const info = describeAdapter(device);
  console.log(`adapter: ${info.description}; features: ${info.features.join(", ")}`);
  assert.ok(device.limits.maxBufferSize > 256 * 1024 * 1024, "maxBufferSize requested");
  assert.ok(device.limits.maxStorageBuffersPerShaderStage >= 8);
  assert.ok(device.limits.maxComputeWorkgroupStorageSize >= 16384);
  assert.equal(info.limits.maxBufferSize, device.limits.maxBufferSize);
});

gpuTest("smoke kernel: generated WGSL runs and reads back", async ({ device, track }) => {
  const rng = new Rng(1);
  const n = 1000;
  const a = rng.gaussians(n);
  const b = rng.gaussians(n);
  const code = composeShader({}, SMOKE_WGSL);
  const pipeline = await getPipeline(device, { label: "turboquant/smoke", code });
  assert.equal(await getPipeline(device, { label: "turboquant/smoke", code }), pipeline);
  assert.ok(cachedPipelineCount(device) >= 1);
  const groups = Math.ceil(n / 64);
  const uniform = track(
    createBuffer(
      device,
      "turboquant/smoke-params",
      PARAMS.size,
      GPUBufferUsage.UNIFORM,
      PARAMS.pack({ n, groups_x: groups, scale: 2 }),
    ),
  );
  const bufA = track(createBuffer(device, "turboquant/smoke-a", n * 4, undefined, a));
  const bufB = track(createBuffer(device, "turboquant/smoke-b", n * 4, undefined, b));
  const out = track(createBuffer(device, "turboquant/smoke-out", n * 4));
  const timer = track(new GpuTimer(device));
  await withErrorScopes(device, "smoke", () => {
    const encoder = device.createCommandEncoder({ label: "turboquant/smoke" });
    const pass = encoder.beginComputePass({ timestampWrites: timer.passTimestamps() });
    pass.setPipeline(pipeline);
    pass.setBindGroup(
      0,
      device.createBindGroup({
        layout: pipeline.getBindGroupLayout(0),
        entries: [
          { binding: 0, resource: { buffer: uniform } },
          { binding: 1, resource: { buffer: bufA } },
          { binding: 2, resource: { buffer: bufB } },
          { binding: 3, resource: { buffer: out } },
        ],
      }),
    );
    pass.dispatchWorkgroups(groups);
    pass.end();
    timer.resolve(encoder);
    device.queue.submit([encoder.finish()]);
  });
  const got = new Float32Array(await readBuffer(device, out));
  for (let i = 0; i < n; i++) assert.equal(got[i], Math.fround(a[i] * 2 + b[i]), `index ${i}`);
  const ms = await timer.readMs();
  if (timer.enabled) {
    assert.equal(ms?.length, 1);
    assert.ok(ms![0] >= 0);
  }
});

gpuTest("error scopes: validation errors become TurboQuantError", async ({ device }) => {
  await assert.rejects(
    withErrorScopes(device, "bad buffer", () => {
      device.createBuffer({ label: "turboquant/bad", size: 4, usage: 0 });
    }),
    (e) =>
      e instanceof TurboQuantError && e.code === "gpu-validation" && /bad buffer/.test(e.message),
  );
  await assert.rejects(
    getPipeline(device, { label: "turboquant/broken", code: "fn main( {" }),
    (e) => e instanceof TurboQuantError && e.code === "gpu-validation",
  );
});

gpuTest("device loss: tracked and reported as device-lost", async () => {
  const device = await requestTurboQuantDevice({ label: "turboquant/doomed" });
  const { checkDeviceAlive } = await import("../src/gpu/_errors.ts");
  checkDeviceAlive(device, "alive");
  device.destroy();
  await device.lost;
  await new Promise((r) => setTimeout(r, 0));
  assert.throws(
    () => checkDeviceAlive(device, "after destroy"),
    (e) => e instanceof TurboQuantError && e.code === "device-lost",
  );
});

Deno.test("no adapter: requestTurboQuantDevice throws no-adapter", async () => {
  // Shadow the prototype's getter on the instance, then delete the shadow to restore it.
  Object.defineProperty(navigator, "gpu", { value: undefined, configurable: true });
  try {
    await assert.rejects(
      requestTurboQuantDevice(),
      (e) => e instanceof TurboQuantError && e.code === "no-adapter",
    );
  } finally {
    delete (navigator as unknown as Record<string, unknown>).gpu;
  }
});
