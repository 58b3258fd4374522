/**
 * Loss-histogram maths for the brush: a brushed loss range [lo, hi] becomes the fork
 * selection `quantile:QLO:QHI`, where QLO/QHI are the fractions of the epoch's samples
 * whose loss is below lo/hi, read off the histogram's cumulative counts (linear inside a
 * bin — the histogram is all the view has, and the supervisor resolves the spec on the
 * exact per-sample losses).
 */

export interface Histogram {
  /** bins + 1 increasing edges. */
  edges: number[];
  /** counts[i]: samples with edges[i] <= loss < edges[i + 1] (last bin closed). */
  counts: number[];
}

export function totalCount(h: Histogram): number {
  let n = 0;
  for (const c of h.counts) n += c;
  return n;
}

/** Whether the histogram has the shape the maths below assumes. */
export function isValidHistogram(h: Histogram): boolean {
  if (h.counts.length === 0 || h.edges.length !== h.counts.length + 1) return false;
  for (let i = 1; i < h.edges.length; i++) if (!(h.edges[i] >= h.edges[i - 1])) return false;
  return h.counts.every((c) => c >= 0);
}

/** Fraction of samples with loss <= x, interpolating linearly inside the bin x falls in. */
export function cumulativeFraction(h: Histogram, x: number): number {
  const total = totalCount(h);
  if (total === 0) return 0;
  const { edges, counts } = h;
  if (x <= edges[0]) return 0;
  if (x >= edges[edges.length - 1]) return 1;
  let below = 0;
  for (let i = 0; i < counts.length; i++) {
    const a = edges[i];
    const b = edges[i + 1];
    if (x >= b) {
      below += counts[i];
      continue;
    }
    const frac = b > a ? (x - a) / (b - a) : 1;
    below += counts[i] * frac;
    break;
  }
  return Math.min(1, Math.max(0, below / total));
}

/** The loss at quantile q (0..1) — the inverse of cumulativeFraction. */
export function quantileValue(h: Histogram, q: number): number {
  const total = totalCount(h);
  const { edges, counts } = h;
  if (total === 0) return edges[0];
  const target = Math.min(1, Math.max(0, q)) * total;
  let below = 0;
  for (let i = 0; i < counts.length; i++) {
    if (counts[i] > 0 && below + counts[i] >= target) {
      const frac = (target - below) / counts[i];
      return edges[i] + frac * (edges[i + 1] - edges[i]);
    }
    below += counts[i];
  }
  return edges[edges.length - 1];
}

/** "0.85", "1.0", "0.0", "0.1234": at most 4 decimals, at least one. */
export function formatQuantile(q: number): string {
  const s = (Math.round(q * 10000) / 10000).toFixed(4).replace(/0+$/, '');
  return s.endsWith('.') ? `${s}0` : s;
}

export interface QuantileSelection {
  lo: number;
  hi: number;
  /** `quantile:LO:HI` */
  spec: string;
  /** Samples (approximately) inside the range. */
  samples: number;
}

/**
 * The quantile selection of a brushed loss range. The bounds are widened to whole
 * 1/10000ths (lo down, hi up) so the spec never selects less than was brushed; a range
 * reaching past the last edge ends at exactly 1.0.
 */
export function brushToQuantile(h: Histogram, lossLo: number, lossHi: number): QuantileSelection {
  const a = Math.min(lossLo, lossHi);
  const b = Math.max(lossLo, lossHi);
  let qlo = Math.floor(cumulativeFraction(h, a) * 10000) / 10000;
  let qhi = Math.ceil(cumulativeFraction(h, b) * 10000) / 10000;
  qlo = Math.min(1, Math.max(0, qlo));
  qhi = Math.min(1, Math.max(0, qhi));
  if (qhi <= qlo) {
    // A brush inside an empty stretch: keep a valid, minimal range.
    qhi = Math.min(1, qlo + 0.0001);
    if (qhi <= qlo) qlo = Math.max(0, qhi - 0.0001);
  }
  return {
    lo: qlo,
    hi: qhi,
    spec: `quantile:${formatQuantile(qlo)}:${formatQuantile(qhi)}`,
    samples: Math.round((qhi - qlo) * totalCount(h)),
  };
}

export interface ParsedQuantile {
  lo: number;
  hi: number;
}

/** Parses `quantile:LO:HI` (0 <= LO < HI <= 1); null for any other SPEC or a bad range. */
export function parseQuantileSpec(spec: string): ParsedQuantile | null {
  const m = /^quantile:([0-9.]+):([0-9.]+)$/.exec(spec.trim());
  if (!m) return null;
  const lo = Number(m[1]);
  const hi = Number(m[2]);
  if (!Number.isFinite(lo) || !Number.isFinite(hi) || lo < 0 || hi > 1 || lo >= hi) return null;
  return { lo, hi };
}

/** The loss range a quantile selection covers (to redraw a brush from a typed spec). */
export function quantileToLossRange(h: Histogram, q: ParsedQuantile): [number, number] {
  return [quantileValue(h, q.lo), quantileValue(h, q.hi)];
}

/** Checks a selection SPEC the way the CLI documents it; returns an error text or null. */
export function validateSelectSpec(spec: string): string | null {
  const s = spec.trim();
  if (s === 'all') return null;
  if (s.startsWith('quantile:')) {
    return parseQuantileSpec(s) ? null : 'quantile:LO:HI needs 0 <= LO < HI <= 1, e.g. quantile:0.85:1.0';
  }
  if (/^kmeans:auto(:cluster=\d+)?$/.test(s)) return null;
  if (/^indices:.+/.test(s)) return null;
  return 'selection must be all, quantile:LO:HI, kmeans:auto[:cluster=K] or indices:FILE';
}
