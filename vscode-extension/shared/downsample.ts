/**
 * Bucketing and downsampling of step series — the same min/max-per-bucket scheme the
 * supervisor uses for GetMetrics(max_points), so a series the view compacts itself looks
 * like one the server sent: every spike survives, at most `maxPoints` points.
 */

export interface Series {
  /** Increasing steps. */
  steps: number[];
  /** values[i] belongs to steps[i]; null = no value (a gap). */
  values: (number | null)[];
}

/** Index of the bucket `step` falls in when [from, to] is cut into `buckets` equal parts. */
export function bucketIndex(step: number, from: number, to: number, buckets: number): number {
  if (buckets <= 1 || to <= from) return 0;
  const i = Math.floor(((step - from) / (to - from)) * buckets);
  return Math.min(buckets - 1, Math.max(0, i));
}

/**
 * Keeps, per bucket of consecutive points, the point with the smallest and the one with
 * the largest value (in step order, once if they are the same point) — exactly the
 * supervisor's GetMetrics(max_points) scheme: buckets = maxPoints / 2, bucket edges
 * floor(linspace(0, n, buckets + 1)). Series at or below `maxPoints` come back unchanged.
 * A bucket with no finite value keeps its first point, so gaps stay visible.
 */
export function minMaxDownsample(s: Series, maxPoints: number): Series {
  const n = s.steps.length;
  const buckets = Math.max(1, Math.floor(maxPoints / 2));
  if (maxPoints <= 0 || n <= maxPoints || buckets >= n) return { steps: s.steps.slice(), values: s.values.slice() };
  const steps: number[] = [];
  const values: (number | null)[] = [];
  for (let b = 0; b < buckets; b++) {
    const start = Math.floor((b * n) / buckets);
    const end = Math.floor(((b + 1) * n) / buckets);
    if (end <= start) continue;
    let lo = -1;
    let hi = -1;
    for (let j = start; j < end; j++) {
      const v = s.values[j];
      if (v === null || !Number.isFinite(v)) continue;
      if (lo < 0 || v < (s.values[lo] as number)) lo = j;
      if (hi < 0 || v > (s.values[hi] as number)) hi = j;
    }
    if (lo < 0) {
      steps.push(s.steps[start]);
      values.push(s.values[start]);
      continue;
    }
    const a = Math.min(lo, hi);
    const c = Math.max(lo, hi);
    steps.push(s.steps[a]);
    values.push(s.values[a]);
    if (c !== a) {
      steps.push(s.steps[c]);
      values.push(s.values[c]);
    }
  }
  return { steps, values };
}

/** Index of the first element of sorted `arr` that is >= x (arr.length if none). */
export function lowerBound(arr: ArrayLike<number>, x: number): number {
  let lo = 0;
  let hi = arr.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (arr[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** The part of a series with from <= step <= to (to = Infinity for no upper bound). */
export function sliceRange(s: Series, from: number, to: number): Series {
  const a = lowerBound(s.steps, from);
  const b = to === Infinity ? s.steps.length : lowerBound(s.steps, to + 1e-9);
  return { steps: s.steps.slice(a, b), values: s.values.slice(a, b) };
}

/**
 * A growing series for a live chart: starts from what GetMetrics returned, then takes
 * live points. Points at or before the last step replace nothing (the server's view
 * wins; replays after a reconnect are therefore harmless). When it grows past
 * `capacity` it compacts itself to capacity/2 points with min/max buckets, so memory
 * and draw cost stay bounded however long training runs.
 */
export class SeriesBuffer {
  steps: number[] = [];
  values: (number | null)[] = [];
  /** Points the series stands for (server total + live appended). */
  total = 0;

  constructor(readonly capacity = 4000) {}

  reset(s?: Series, total?: number): void {
    this.steps = s ? s.steps.slice() : [];
    this.values = s ? s.values.slice() : [];
    this.total = total ?? this.steps.length;
  }

  get length(): number {
    return this.steps.length;
  }

  get lastStep(): number {
    return this.steps.length ? this.steps[this.steps.length - 1] : -Infinity;
  }

  /** Appends a point if it is newer than the last one; returns whether it was taken. */
  push(step: number, value: number | null): boolean {
    if (step <= this.lastStep) return false;
    this.steps.push(step);
    this.values.push(value);
    this.total += 1;
    if (this.steps.length > this.capacity) this.compact();
    return true;
  }

  compact(): void {
    const d = minMaxDownsample({ steps: this.steps, values: this.values }, Math.floor(this.capacity / 2));
    this.steps = d.steps;
    this.values = d.values;
  }
}

/** Number of points to ask the server for so a chart gets about one per pixel. */
export function pointsForWidth(cssPixels: number, devicePixelRatio = 1): number {
  const px = Math.round(cssPixels * Math.min(2, Math.max(1, devicePixelRatio)));
  return Math.max(50, Math.min(4000, px));
}

/** Zooms [min, max] by `factor` (< 1 zooms in) around `anchor`, never past [lo, hi]. */
export function zoomRange(
  min: number,
  max: number,
  anchor: number,
  factor: number,
  lo = -Infinity,
  hi = Infinity,
): [number, number] {
  let a = anchor - (anchor - min) * factor;
  let b = anchor + (max - anchor) * factor;
  if (b - a < 2) {
    a = anchor - 1;
    b = anchor + 1;
  }
  return clampRange(a, b, lo, hi);
}

/** Shifts [min, max] by `delta`, keeping the width, never past [lo, hi]. */
export function panRange(min: number, max: number, delta: number, lo = -Infinity, hi = Infinity): [number, number] {
  return clampRange(min + delta, max + delta, lo, hi);
}

function clampRange(a: number, b: number, lo: number, hi: number): [number, number] {
  const w = b - a;
  if (hi - lo <= w) return [Math.max(a, lo), Math.min(b, hi)];
  if (a < lo) return [lo, lo + w];
  if (b > hi) return [hi - w, hi];
  return [a, b];
}
