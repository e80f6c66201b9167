/**
 * A tiny dependency-free SVG line-plot writer: numeric x axis, linear or log10 y axis, one
 * polyline with markers per series, a legend, dashed horizontal reference lines, a title.
 *
 * @module
 */

/** One line of the plot. */
export interface PlotSeries {
  /** Legend label. */
  name: string;
  /** Points as [x, y]; sorted by x when drawn. On a log axis points with y <= 0 are skipped. */
  points: readonly (readonly [number, number])[];
  /** Stroke colour (CSS); default from a colour-blind-safe palette. */
  color?: string;
  /** SVG stroke-dasharray, e.g. "6 4"; default solid. */
  dash?: string;
  /** Marker drawn at every point; default by series index. */
  marker?: MarkerShape;
}

/** Marker shapes. */
export type MarkerShape = "circle" | "square" | "triangle" | "diamond";

/** A dashed horizontal line with a label, e.g. an f16 reference level. */
export interface ReferenceLine {
  /** Label drawn above the line, at the right end. */
  name: string;
  /** Height of the line in data units. */
  y: number;
}

/**
 * Options of {@linkcode linePlotSvg}. The legend sits below the plot area (the height includes
 * it), so it never hides data.
 */
export interface LinePlotOptions {
  /** Title above the plot. */
  title: string;
  /** Smaller second title line. */
  subtitle?: string;
  /** Label of the x axis. */
  xLabel: string;
  /** Label of the y axis (drawn rotated). */
  yLabel: string;
  /** The lines. */
  series: readonly PlotSeries[];
  /** Horizontal reference lines. */
  references?: readonly ReferenceLine[];
  /** log10 y axis (default false). */
  logY?: boolean;
  /** Tick positions of the x axis; default {@linkcode niceTicks} of the data range. */
  xTicks?: readonly number[];
  /** Width in pixels (default 760). */
  width?: number;
  /** Height in pixels (default 500). */
  height?: number;
}

/** Okabe-Ito colours, distinguishable with the common colour-vision deficiencies. */
export const PALETTE: readonly string[] = [
  "#0072B2",
  "#D55E00",
  "#009E73",
  "#CC79A7",
  "#E69F00",
  "#56B4E9",
  "#000000",
];

const MARKERS: readonly MarkerShape[] = ["circle", "square", "triangle", "diamond"];

/** Escapes text for SVG content and attribute values. */
export function escapeXml(s: string): string {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&apos;");
}

/** About `count` round tick values (steps 1, 2 or 5 times a power of ten) covering [min, max]. */
export function niceTicks(min: number, max: number, count = 6): number[] {
  if (!Number.isFinite(min) || !Number.isFinite(max) || max < min) {
    throw new RangeError(`bad tick range ${min}..${max}`);
  }
  if (max === min) return [min];
  const raw = (max - min) / Math.max(1, count - 1);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag;
  const ticks: number[] = [];
  for (let v = Math.ceil(min / step - 1e-9) * step; v <= max + step * 1e-9; v += step) {
    ticks.push(Number(v.toPrecision(12)));
  }
  return ticks;
}

/** Decades spanning [min, max] (both > 0): the exponents floor(log10 min) .. ceil(log10 max). */
export function decadeRange(min: number, max: number): [number, number] {
  if (!(min > 0) || !(max >= min)) throw new RangeError(`bad log range ${min}..${max}`);
  const lo = Math.floor(Math.log10(min) + 1e-9);
  let hi = Math.ceil(Math.log10(max) - 1e-9);
  if (hi === lo) hi = lo + 1;
  return [lo, hi];
}

/** Short tick label: integers plain, others with up to 3 significant digits. */
export function formatTick(v: number): string {
  if (Number.isInteger(v)) return String(v);
  return String(Number(v.toPrecision(3)));
}

function fmt(v: number): string {
  return Number(v.toFixed(2)).toString();
}

function markerSvg(shape: MarkerShape, x: number, y: number, color: string): string {
  const r = 4.5;
  const fill = `fill="${color}" stroke="#ffffff" stroke-width="1"`;
  switch (shape) {
    case "circle":
      return `<circle cx="${fmt(x)}" cy="${fmt(y)}" r="${r}" ${fill}/>`;
    case "square":
      return `<rect x="${fmt(x - r)}" y="${fmt(y - r)}" width="${2 * r}" height="${
        2 * r
      }" ${fill}/>`;
    case "triangle":
      return `<path d="M${fmt(x)} ${fmt(y - r * 1.2)}L${fmt(x + r * 1.1)} ${fmt(y + r * 0.8)}` +
        `L${fmt(x - r * 1.1)} ${fmt(y + r * 0.8)}Z" ${fill}/>`;
    case "diamond":
      return `<path d="M${fmt(x)} ${fmt(y - r * 1.3)}L${fmt(x + r * 1.1)} ${fmt(y)}` +
        `L${fmt(x)} ${fmt(y + r * 1.3)}L${fmt(x - r * 1.1)} ${fmt(y)}Z" ${fill}/>`;
  }
}

/** Renders the plot as a standalone SVG document. */
export function linePlotSvg(options: LinePlotOptions): string {
  const W = options.width ?? 760;
  const H = options.height ?? 500;
  const logY = options.logY ?? false;
  const series = options.series.map((s, i) => ({
    ...s,
    color: s.color ?? PALETTE[i % PALETTE.length],
    marker: s.marker ?? MARKERS[i % MARKERS.length],
    points: [...s.points].filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y))
      .filter(([, y]) => !logY || y > 0).sort((a, b) => a[0] - b[0]),
  }));
  const refs = (options.references ?? []).filter((r) => Number.isFinite(r.y) && (!logY || r.y > 0));
  const xs = series.flatMap((s) => s.points.map((p) => p[0]));
  const ys = [...series.flatMap((s) => s.points.map((p) => p[1])), ...refs.map((r) => r.y)];
  if (xs.length === 0) throw new RangeError("nothing to plot: every series is empty");

  // Layout: margins leave room for the title, the tick labels and the axis labels.
  const top = options.subtitle ? 74 : 56;
  const m = { left: 82, right: 24, top, bottom: 62 + options.series.length * 21 + 22 };
  const pw = W - m.left - m.right;
  const ph = H - m.top - m.bottom;

  const xTicks = options.xTicks ? [...options.xTicks] : niceTicks(Math.min(...xs), Math.max(...xs));
  const xMin = Math.min(...xs, ...xTicks);
  const xMax = Math.max(...xs, ...xTicks);
  const xPad = (xMax - xMin) * 0.03 || 1;
  const x0 = xMin - xPad;
  const x1 = xMax + xPad;
  const px = (x: number): number => m.left + ((x - x0) / (x1 - x0)) * pw;

  let py: (y: number) => number;
  const grid: string[] = [];
  const yLabels: string[] = [];
  if (logY) {
    const [lo, hi] = decadeRange(Math.min(...ys), Math.max(...ys));
    // A little room beyond the outer decades, so markers on them are not cut.
    const pad = 0.03 * (hi - lo);
    py = (y: number) => m.top + ((hi + pad - Math.log10(y)) / (hi - lo + 2 * pad)) * ph;
    for (let e = lo; e <= hi; e++) {
      const y = py(10 ** e);
      grid.push(
        `<line x1="${m.left}" y1="${fmt(y)}" x2="${m.left + pw}" y2="${fmt(y)}" ` +
          `stroke="#d0d0d0" stroke-width="1"/>`,
      );
      yLabels.push(
        `<text x="${m.left - 8}" y="${fmt(y + 5)}" text-anchor="end">10<tspan dy="-7" ` +
          `font-size="11">${e}</tspan></text>`,
      );
      if (e < hi) {
        for (let k = 2; k <= 9; k++) {
          const yk = py(k * 10 ** e);
          grid.push(
            `<line x1="${m.left}" y1="${fmt(yk)}" x2="${m.left + pw}" y2="${fmt(yk)}" ` +
              `stroke="#eeeeee" stroke-width="1"/>`,
          );
        }
      }
    }
  } else {
    const yTicks = niceTicks(Math.min(...ys), Math.max(...ys));
    const lo = Math.min(...ys, ...yTicks);
    const hi = Math.max(...ys, ...yTicks);
    const span = hi - lo || 1;
    py = (y: number) => m.top + ((hi - y) / span) * ph;
    for (const t of yTicks) {
      const y = py(t);
      grid.push(
        `<line x1="${m.left}" y1="${fmt(y)}" x2="${m.left + pw}" y2="${fmt(y)}" ` +
          `stroke="#d0d0d0" stroke-width="1"/>`,
      );
      yLabels.push(
        `<text x="${m.left - 8}" y="${fmt(y + 5)}" text-anchor="end">` +
          `${formatTick(t)}</text>`,
      );
    }
  }
  const xLabels: string[] = [];
  for (const t of xTicks) {
    const x = px(t);
    grid.push(
      `<line x1="${fmt(x)}" y1="${m.top}" x2="${fmt(x)}" y2="${m.top + ph}" ` +
        `stroke="#e4e4e4" stroke-width="1"/>`,
    );
    xLabels.push(
      `<text x="${fmt(x)}" y="${m.top + ph + 20}" text-anchor="middle">` +
        `${formatTick(t)}</text>`,
    );
  }

  const lines: string[] = [];
  for (const r of refs) {
    const y = py(r.y);
    lines.push(
      `<line x1="${m.left}" y1="${fmt(y)}" x2="${m.left + pw}" y2="${fmt(y)}" ` +
        `stroke="#777777" stroke-width="1.2" stroke-dasharray="2 4"/>`,
    );
    lines.push(
      `<text x="${m.left + pw - 6}" y="${fmt(y - 5)}" text-anchor="end" font-size="12" ` +
        `fill="#555555">` +
        `${escapeXml(r.name)}</text>`,
    );
  }
  for (const s of series) {
    const pts = s.points.map(([x, y]) => `${fmt(px(x))},${fmt(py(y))}`).join(" ");
    const dash = s.dash ? ` stroke-dasharray="${escapeXml(s.dash)}"` : "";
    lines.push(
      `<polyline points="${pts}" fill="none" stroke="${escapeXml(s.color)}" ` +
        `stroke-width="2.2" stroke-linejoin="round"${dash}/>`,
    );
    for (const [x, y] of s.points) lines.push(markerSvg(s.marker, px(x), py(y), s.color));
  }

  // Legend below the axis label, one row per series, so that it never hides data.
  const rowH = 21;
  const legendTop = m.top + ph + 58;
  const legendW = Math.max(...series.map((s) => s.name.length)) * 7.2 + 56;
  const lx = m.left + (pw - legendW) / 2;
  const legend: string[] = [
    `<rect x="${fmt(lx)}" y="${legendTop}" width="${fmt(legendW)}" ` +
    `height="${series.length * rowH + 10}" fill="#ffffff" stroke="#bbbbbb"/>`,
  ];
  series.forEach((s, i) => {
    const y = legendTop + 5 + rowH * i + rowH / 2;
    const dash = s.dash ? ` stroke-dasharray="${escapeXml(s.dash)}"` : "";
    legend.push(
      `<line x1="${fmt(lx + 8)}" y1="${fmt(y)}" x2="${fmt(lx + 40)}" y2="${fmt(y)}" ` +
        `stroke="${escapeXml(s.color)}" stroke-width="2.2"${dash}/>`,
    );
    legend.push(markerSvg(s.marker, lx + 24, y, s.color));
    legend.push(
      `<text x="${fmt(lx + 48)}" y="${fmt(y + 4.5)}" font-size="13">` +
        `${escapeXml(s.name)}</text>`,
    );
  });

  const cx = m.left + pw / 2;
  const titles = [
    `<text x="${W / 2}" y="26" text-anchor="middle" font-size="17" font-weight="bold">` +
    `${escapeXml(options.title)}</text>`,
  ];
  if (options.subtitle) {
    titles.push(
      `<text x="${W / 2}" y="48" text-anchor="middle" font-size="13" fill="#444444">` +
        `${escapeXml(options.subtitle)}</text>`,
    );
  }
  return [
    `<?xml version="1.0" encoding="UTF-8"?>`,
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" ` +
    `viewBox="0 0 ${W} ${H}" font-family="Helvetica, Arial, sans-serif" font-size="13">`,
    `<rect width="${W}" height="${H}" fill="#ffffff"/>`,
    ...titles,
    ...grid,
    `<rect x="${m.left}" y="${m.top}" width="${pw}" height="${ph}" fill="none" stroke="#333333"/>`,
    `<clipPath id="plot-area"><rect x="${m.left}" y="${m.top}" width="${pw}" height="${ph}"/>` +
    `</clipPath>`,
    `<g clip-path="url(#plot-area)">`,
    ...lines,
    `</g>`,
    ...xLabels,
    ...yLabels,
    `<text x="${fmt(cx)}" y="${m.top + ph + 44}" text-anchor="middle" font-size="14">` +
    `${escapeXml(options.xLabel)}</text>`,
    `<text transform="translate(20 ${fmt(m.top + ph / 2)}) rotate(-90)" text-anchor="middle" ` +
    `font-size="14">${escapeXml(options.yLabel)}</text>`,
    ...legend,
    `</svg>`,
    ``,
  ].join("\n");
}
