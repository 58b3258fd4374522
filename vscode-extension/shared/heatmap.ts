/**
 * The loss-by-epoch heatmap's pure parts: common bin edges for several epochs'
 * histograms, re-binning counts onto those edges (the supervisor picks each epoch's
 * range from its own losses), per-column fractions and the log-ish colour scale.
 */

export interface BinnedCounts {
  /** bins + 1 ascending edges. */
  edges: number[];
  counts: number[];
}

export interface HeatmapGrid {
  /** Shared bins + 1 edges (the y axis). */
  edges: number[];
  /** One column per epoch, ascending (the x axis). */
  epochs: number[];
  /** fractions[col][bin]: share of that epoch's samples in the bin (each column sums to 1, or is all 0). */
  fractions: number[][];
}

function validEdges(e: number[]): boolean {
  if (e.length < 2) return false;
  for (let i = 0; i < e.length; i++) {
    if (!Number.isFinite(e[i]) || (i > 0 && e[i] < e[i - 1])) return false;
  }
  return true;
}

/** `bins` equal-width edges spanning every histogram's range; null when none has a valid range. */
export function commonEdges(hists: BinnedCounts[], bins: number): number[] | null {
  let lo = Infinity;
  let hi = -Infinity;
  for (const hst of hists) {
    if (!validEdges(hst.edges) || hst.counts.length !== hst.edges.length - 1) continue;
    if (!hst.counts.some((c) => c > 0)) continue;
    lo = Math.min(lo, hst.edges[0]);
    hi = Math.max(hi, hst.edges[hst.edges.length - 1]);
  }
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return null;
  const n = Math.max(1, Math.floor(bins));
  if (hi <= lo) hi = lo + (Math.abs(lo) || 1) * 1e-6;
  const out: number[] = [];
  for (let i = 0; i <= n; i++) out.push(i === n ? hi : lo + ((hi - lo) * i) / n);
  return out;
}

/** Index of the target bin holding v (clamped to the first / last bin). */
function binOf(edges: number[], v: number): number {
  const last = edges.length - 2;
  if (v <= edges[0]) return 0;
  if (v >= edges[last + 1]) return last;
  let a = 0;
  let b = last + 1;
  while (b - a > 1) {
    const m = (a + b) >> 1;
    if (edges[m] <= v) a = m;
    else b = m;
  }
  return a;
}

/**
 * Spreads each source bin's count over the target bins in proportion to their overlap
 * (uniform density within a bin). Mass outside the target range goes to the nearest
 * edge bin, so the total is preserved. Identical edges return the counts unchanged.
 */
export function rebin(src: BinnedCounts, target: number[]): number[] {
  const out = new Array<number>(Math.max(0, target.length - 1)).fill(0);
  if (!out.length || !validEdges(target) || !validEdges(src.edges)) return out;
  const n = Math.min(src.counts.length, src.edges.length - 1);
  for (let i = 0; i < n; i++) {
    const c = src.counts[i];
    if (!(c > 0)) continue;
    const a = src.edges[i];
    const b = src.edges[i + 1];
    if (b <= a) {
      out[binOf(target, a)] += c;
      continue;
    }
    const first = binOf(target, a);
    const lastBin = binOf(target, b);
    let placed = 0;
    for (let j = first; j <= lastBin; j++) {
      // The edge bins also take what lies beyond the target range.
      const lo = j === 0 ? -Infinity : target[j];
      const hi = j === out.length - 1 ? Infinity : target[j + 1];
      const overlap = Math.min(b, hi) - Math.max(a, lo);
      if (overlap <= 0) continue;
      const share = j === lastBin ? c - placed : (c * overlap) / (b - a);
      out[j] += share;
      placed += share;
    }
  }
  return out;
}

/** Per-epoch histograms -> columns of fractions on common edges (epochs ascending, empty ones dropped). */
export function buildHeatmap(perEpoch: { epoch: number; edges: number[]; counts: number[] }[], bins: number): HeatmapGrid | null {
  const edges = commonEdges(perEpoch, bins);
  if (!edges) return null;
  const cols = perEpoch
    .filter((d) => d.counts.some((c) => c > 0))
    .slice()
    .sort((a, b) => a.epoch - b.epoch);
  const epochs: number[] = [];
  const fractions: number[][] = [];
  for (const d of cols) {
    if (epochs.length && epochs[epochs.length - 1] === d.epoch) continue;
    const counts = rebin(d, edges);
    const total = counts.reduce((s, c) => s + c, 0);
    epochs.push(d.epoch);
    fractions.push(counts.map((c) => (total > 0 ? c / total : 0)));
  }
  return epochs.length ? { edges, epochs, fractions } : null;
}

/** Log-ish position on the colour scale: 0 -> 0, 1 -> 1, small fractions stretched. */
export function logScale(fraction: number, k = 1000): number {
  if (!(fraction > 0)) return 0;
  if (fraction >= 1) return 1;
  return Math.log1p(k * fraction) / Math.log1p(k);
}

/** Viridis-like stops, dark (empty) to bright (dense). */
const STOPS: [number, number, number][] = [
  [22, 22, 38],
  [59, 34, 110],
  [33, 104, 142],
  [33, 160, 135],
  [122, 209, 81],
  [253, 231, 37],
];

/** The colour of a cell holding `fraction` of its epoch's samples, as [r, g, b]. */
export function heatColor(fraction: number): [number, number, number] {
  const t = logScale(fraction) * (STOPS.length - 1);
  const i = Math.min(STOPS.length - 2, Math.floor(t));
  const f = t - i;
  const a = STOPS[i];
  const b = STOPS[i + 1];
  return [Math.round(a[0] + (b[0] - a[0]) * f), Math.round(a[1] + (b[1] - a[1]) * f), Math.round(a[2] + (b[2] - a[2]) * f)];
}
