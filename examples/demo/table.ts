/**
 * Plain-text and markdown tables for the demo's output.
 *
 * @module
 */

/** Column alignment. */
export type Align = "left" | "right";

/** A table: header cells, rows of cells (same count), and per-column alignment. */
export interface Table {
  /** Header cells. */
  headers: readonly string[];
  /** Body rows; each has `headers.length` cells. */
  rows: readonly (readonly string[])[];
  /** Alignment per column; default: first column left, the others right. */
  align?: readonly Align[];
}

function checkTable(t: Table): Align[] {
  for (const [i, r] of t.rows.entries()) {
    if (r.length !== t.headers.length) {
      throw new RangeError(`row ${i} has ${r.length} cells, the header ${t.headers.length}`);
    }
  }
  return t.headers.map((_, i) => t.align?.[i] ?? (i === 0 ? "left" : "right"));
}

function pad(s: string, width: number, align: Align): string {
  return align === "left" ? s.padEnd(width) : s.padStart(width);
}

/** Column-aligned text for a terminal: a header, a dashed rule, the rows. */
export function textTable(t: Table): string {
  const align = checkTable(t);
  const widths = t.headers.map((h, i) => Math.max(h.length, ...t.rows.map((r) => r[i].length)));
  const line = (cells: readonly string[]) =>
    cells.map((c, i) => pad(c, widths[i], align[i])).join("  ").trimEnd();
  return [line(t.headers), widths.map((w) => "-".repeat(w)).join("  "), ...t.rows.map(line)]
    .join("\n");
}

/** GitHub-flavoured markdown (pipes in cells are escaped). */
export function markdownTable(t: Table): string {
  const align = checkTable(t);
  const cell = (s: string) => s.replace(/\|/g, "\\|");
  const row = (cells: readonly string[]) => `| ${cells.map(cell).join(" | ")} |`;
  const rule = `|${align.map((a) => (a === "left" ? " --- " : " ---: ")).join("|")}|`;
  return [row(t.headers), rule, ...t.rows.map(row)].join("\n");
}
