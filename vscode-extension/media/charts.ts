/**
 * Live step charts (uPlot, step axis). Each chart starts from GetMetrics(run, key,
 * max_points = its pixel width) — the supervisor downsamples min/max per bucket — then
 * appends the points of `metrics` / `eval` events, redrawing at most once per animation
 * frame. Drag-select or the wheel zooms, shift+wheel pans, double-click resets; every
 * zoom or pan re-queries GetMetrics for the visible range so the detail is real, not
 * interpolated. Frame and zoom timings are recorded in `Perf`.
 */
import uPlot from 'uplot';
import 'uplot/dist/uPlot.min.css';
import { SeriesBuffer, type Series, panRange, pointsForWidth, zoomRange } from '../shared/downsample';
import type { MetricPoint } from '../shared/events';
import { h } from './dom';
import { type HostRpc, RpcFailure } from './rpc';

export interface ChartSpec {
  id: string;
  title: string;
  /** Metric keys, most preferred first: GetMetrics tries them in order; live points may carry any. */
  keys: string[];
  color: string;
}

export const CHARTS: ChartSpec[] = [
  { id: 'loss', title: 'Loss', keys: ['loss'], color: '#4e9bff' },
  { id: 'val_loss', title: 'Val loss', keys: ['val_loss'], color: '#ff8c3a' },
  { id: 'accuracy', title: 'Val accuracy', keys: ['val_accuracy', 'accuracy'], color: '#3ccf7a' },
  { id: 'lr', title: 'Learning rate', keys: ['lr'], color: '#c586ff' },
  { id: 'grad_norm', title: 'Grad norm', keys: ['grad_norm'], color: '#ff5f6d' },
  { id: 'throughput', title: 'Throughput (samples/s)', keys: ['samples_per_s'], color: '#e5c07b' },
  { id: 'memory', title: 'memory (MiB)', keys: ['memory_mb'], color: '#56b6c2' },
];

/** Timings the browser test reads from window.__ontheflyPerf. */
export interface Perf {
  /** ms from navigation start until a chart first showed data. */
  firstPaintMs: number | null;
  /** ms spent per animation frame that redrew charts (data applied + drawn). */
  frames: number[];
  /** ms from a zoom/pan gesture until the re-queried data was drawn. */
  zooms: number[];
  /** Points drawn per frame (sum over charts), parallel to `frames`. */
  framePoints: number[];
}

class Chart {
  readonly el: HTMLElement;
  readonly plotEl: HTMLElement;
  readonly note: HTMLElement;
  readonly u: uPlot;
  readonly buf = new SeriesBuffer(6000);
  /** GetMetrics key in use (the first of spec.keys with data). */
  key: string;
  zoomData: Series | null = null;
  loading = false;
  queued: MetricPoint[] = [];
  dirty = false;
  everDrawn = false;

  constructor(
    readonly spec: ChartSpec,
    grid: ChartGrid,
  ) {
    this.key = spec.keys[0];
    this.note = h('span', { className: 'chart-note' });
    this.plotEl = h('div', { className: 'chart-plot' });
    this.el = h('div', { className: 'chart', id: `chart-${spec.id}`, 'data-chart': spec.id }, h('div', { className: 'chart-title' }, spec.title, this.note), this.plotEl);
    const fg = themeColor('--otf-fg-muted', '#9a9a9a');
    const gridColor = themeColor('--otf-grid', 'rgba(128,128,128,0.18)');
    const opts: uPlot.Options = {
      width: 320,
      height: 150,
      legend: { show: false },
      cursor: {
        sync: { key: 'onthefly-steps' },
        drag: { x: true, y: false, setScale: false },
      },
      scales: { x: { time: false } },
      axes: [
        { stroke: fg, grid: { stroke: gridColor, width: 1 }, ticks: { stroke: gridColor }, size: 28 },
        {
          stroke: fg,
          grid: { stroke: gridColor, width: 1 },
          ticks: { stroke: gridColor },
          size: 52,
          values: (_u, splits) => splits.map((v) => compact(v)),
        },
      ],
      series: [{ label: 'step' }, { label: spec.title, stroke: spec.color, width: 1.5, spanGaps: true, points: { size: 4 } }],
      hooks: {
        setSelect: [
          (u) => {
            if (u.select.width > 4) {
              const a = u.posToVal(u.select.left, 'x');
              const b = u.posToVal(u.select.left + u.select.width, 'x');
              grid.zoomTo(a, b);
            }
            u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
          },
        ],
      },
    };
    this.u = new uPlot(opts, [[], []], this.plotEl);
    const over = this.u.over;
    over.addEventListener(
      'wheel',
      (e: WheelEvent) => {
        e.preventDefault();
        const sx = this.u.scales.x;
        if (sx.min == null || sx.max == null) return;
        const [lo, hi] = grid.bounds();
        if (e.shiftKey || Math.abs(e.deltaX) > Math.abs(e.deltaY)) {
          const d = (e.shiftKey ? e.deltaY : e.deltaX) > 0 ? 1 : -1;
          const [a, b] = panRange(sx.min, sx.max, d * (sx.max - sx.min) * 0.15, lo, hi);
          grid.zoomTo(a, b);
        } else {
          const anchor = this.u.posToVal(e.offsetX, 'x');
          const [a, b] = zoomRange(sx.min, sx.max, anchor, e.deltaY > 0 ? 1.25 : 0.8, lo, hi);
          grid.zoomTo(a, b);
        }
      },
      { passive: false },
    );
    over.addEventListener('dblclick', () => grid.resetZoom());
  }

  data(): uPlot.AlignedData {
    const s = this.zoomData ?? this.buf;
    return [s.steps, s.values as number[]];
  }

  get pointCount(): number {
    return (this.zoomData ?? this.buf).steps.length;
  }
}

/** A theme colour for canvas drawing (canvas does not resolve CSS variables itself). */
export function themeColor(name: string, fallback: string): string {
  const v = getComputedStyle(document.body).getPropertyValue(name).trim();
  return v || fallback;
}

function compact(v: number): string {
  const a = Math.abs(v);
  if (a === 0) return '0';
  if (a >= 1e9) return v.toExponential(1);
  if (a >= 1e6) return `${Number((v / 1e6).toPrecision(3))}M`;
  if (a >= 1e4) return `${Number((v / 1e3).toPrecision(3))}k`;
  if (a < 1e-3) return v.toExponential(1);
  return Number(v.toPrecision(3)).toString();
}

export class ChartGrid {
  readonly el: HTMLElement;
  private readonly charts: Chart[];
  private run = '';
  private loadGen = 0;
  private zoom: [number, number] | null = null;
  private zoomGen = 0;
  private zoomInFlight = false;
  private zoomQueued = false;
  private zoomT0 = 0;
  private zoomApplied: number | null = null;
  private frameRequested = false;
  private readonly zoomLabel: HTMLElement;

  constructor(
    private readonly rpc: HostRpc,
    private readonly perf: Perf,
    private readonly onError: (e: unknown) => void,
  ) {
    this.zoomLabel = h('span', { className: 'muted', id: 'zoom-label' }, 'full range');
    const reset = h('button', { className: 'small', id: 'btn-zoom-reset', onclick: () => this.resetZoom() }, 'Reset zoom');
    this.charts = CHARTS.map((s) => new Chart(s, this));
    this.el = h(
      'div',
      { className: 'charts-wrap' },
      h('div', { className: 'charts-bar' }, this.zoomLabel, h('span', { className: 'muted hint' }, 'drag: zoom · wheel: zoom · shift+wheel: pan · double-click: reset'), reset),
      h('div', { className: 'charts', id: 'charts' }, ...this.charts.map((c) => c.el)),
    );
    const ro = new ResizeObserver(() => this.resize());
    ro.observe(this.el);
  }

  /** Steps the loaded data spans (the limits of pan and zoom). */
  bounds(): [number, number] {
    let lo = Infinity;
    let hi = -Infinity;
    for (const c of this.charts) {
      if (c.buf.length) {
        lo = Math.min(lo, c.buf.steps[0]);
        hi = Math.max(hi, c.buf.lastStep);
      }
    }
    return Number.isFinite(lo) ? [lo, hi] : [0, 1];
  }

  get runId(): string {
    return this.run;
  }

  private width(): number {
    return Math.max(120, this.charts[0].plotEl.clientWidth || 320);
  }

  resize(): void {
    for (const c of this.charts) {
      const w = Math.max(120, c.el.clientWidth - 2);
      if (Math.abs(c.u.width - w) > 1) c.u.setSize({ width: w, height: 150 });
    }
  }

  /** Shows another run (or reloads the current one): fresh GetMetrics for every chart. */
  async setRun(run: string, force = false): Promise<void> {
    if (run === this.run && !force) return;
    this.run = run;
    this.zoom = null;
    this.zoomLabel.textContent = 'full range';
    const gen = ++this.loadGen;
    const maxPoints = pointsForWidth(this.width(), window.devicePixelRatio);
    await Promise.all(this.charts.map((c) => this.load(c, gen, maxPoints)));
  }

  private async load(c: Chart, gen: number, maxPoints: number): Promise<void> {
    c.loading = true;
    c.queued = [];
    c.zoomData = null;
    c.buf.reset();
    c.note.textContent = '';
    c.dirty = true;
    this.scheduleDraw();
    try {
      // The first key is the documented one; later keys are fallbacks, tried only while
      // the first has no data, and their errors (NOT_FOUND for a key that does not exist) are no news.
      const [first, ...fallbacks] = c.spec.keys;
      const s = await this.rpc.call('getMetrics', { run: this.run, key: first, maxPoints });
      if (gen !== this.loadGen) return;
      c.key = first;
      c.buf.reset(s, s.totalPoints);
      for (const key of s.totalPoints > 0 ? [] : fallbacks) {
        const f = await this.rpc.call('getMetrics', { run: this.run, key, maxPoints }).catch(() => null);
        if (gen !== this.loadGen) return;
        if (f && f.totalPoints > 0) {
          c.key = key;
          c.buf.reset(f, f.totalPoints);
          break;
        }
      }
    } catch (e) {
      if (gen !== this.loadGen) return;
      c.note.textContent = e instanceof RpcFailure ? ` · ${e.error.codeName}` : ' · error';
      c.note.title = e instanceof Error ? e.message : String(e);
      this.onError(e);
    } finally {
      if (gen === this.loadGen) {
        c.loading = false;
        const queued = c.queued;
        c.queued = [];
        this.applyPoints(c, queued);
        c.dirty = true;
        this.scheduleDraw();
      }
    }
  }

  /** Live points of a run (from `metrics` / `eval` events). */
  addPoints(runId: string, points: MetricPoint[]): void {
    if (runId !== this.run || !points.length) return;
    for (const c of this.charts) {
      if (c.loading) {
        c.queued.push(...points);
        continue;
      }
      if (this.applyPoints(c, points)) {
        c.dirty = true;
      }
    }
    this.scheduleDraw();
  }

  private applyPoints(c: Chart, points: MetricPoint[]): boolean {
    let changed = false;
    for (const p of points) {
      let v: number | undefined;
      for (const k of c.spec.keys) {
        if (p.values[k] !== undefined) {
          v = p.values[k];
          break;
        }
      }
      if (v === undefined) continue;
      if (c.buf.push(p.step, v)) changed = true;
    }
    // While zoomed the view shows the queried range; new points show after a reset.
    return changed && !this.zoom;
  }

  /** Shows steps [from, to] on every chart, then re-queries that range. */
  zoomTo(from: number, to: number): void {
    const [lo, hi] = this.bounds();
    let a = Math.max(lo, Math.floor(Math.min(from, to)));
    let b = Math.min(hi, Math.ceil(Math.max(from, to)));
    if (b - a < 2) {
      a = Math.max(lo, a - 1);
      b = Math.min(hi, b + 1);
    }
    if (a <= lo && b >= hi) {
      this.resetZoom();
      return;
    }
    this.zoom = [a, b];
    this.zoomLabel.textContent = `steps ${a}–${b}`;
    this.zoomT0 = performance.now();
    for (const c of this.charts) c.dirty = true; // instant feedback on the data we have
    this.scheduleDraw();
    if (this.zoomInFlight) {
      this.zoomQueued = true;
      return;
    }
    void this.queryZoom();
  }

  resetZoom(): void {
    this.zoom = null;
    this.zoomGen++;
    this.zoomLabel.textContent = 'full range';
    for (const c of this.charts) {
      c.zoomData = null;
      c.dirty = true;
    }
    this.scheduleDraw();
  }

  private async queryZoom(): Promise<void> {
    if (!this.zoom) return;
    const [a, b] = this.zoom;
    const gen = ++this.zoomGen;
    const t0 = this.zoomT0;
    const maxPoints = pointsForWidth(this.width(), window.devicePixelRatio);
    this.zoomInFlight = true;
    const results = await Promise.allSettled(this.charts.map((c) => this.rpc.call('getMetrics', { run: this.run, key: c.key, fromStep: a, toStep: b, maxPoints })));
    this.zoomInFlight = false;
    if (gen === this.zoomGen && this.zoom && this.zoom[0] === a && this.zoom[1] === b) {
      results.forEach((r, i) => {
        const c = this.charts[i];
        if (r.status === 'fulfilled') c.zoomData = { steps: r.value.steps, values: r.value.values };
        c.dirty = true;
      });
      this.zoomApplied = t0;
      this.scheduleDraw();
    }
    const failed = results.find((r) => r.status === 'rejected');
    if (failed && failed.status === 'rejected') this.onError(failed.reason);
    if (this.zoomQueued) {
      this.zoomQueued = false;
      void this.queryZoom();
    }
  }

  /** Drops every chart's data (a different session). */
  clear(): void {
    this.run = '';
    this.loadGen++;
    this.zoom = null;
    for (const c of this.charts) {
      c.buf.reset();
      c.zoomData = null;
      c.queued = [];
      c.dirty = true;
    }
    this.scheduleDraw();
  }

  private scheduleDraw(): void {
    if (this.frameRequested) return;
    this.frameRequested = true;
    requestAnimationFrame(() => this.frame());
  }

  private frame(): void {
    this.frameRequested = false;
    const t0 = performance.now();
    let points = 0;
    let drew = false;
    for (const c of this.charts) {
      if (!c.dirty) continue;
      c.dirty = false;
      const zoom = this.zoom;
      c.u.batch(() => {
        if (zoom) {
          c.u.setData(c.data(), false);
          c.u.setScale('x', { min: zoom[0], max: zoom[1] });
        } else {
          c.u.setData(c.data(), true);
        }
      });
      points += c.pointCount;
      drew = true;
      if (c.pointCount > 0 && !c.everDrawn) {
        c.everDrawn = true;
        if (this.perf.firstPaintMs === null) this.perf.firstPaintMs = performance.now();
      }
    }
    if (!drew) return;
    const t1 = performance.now();
    this.perf.frames.push(t1 - t0);
    this.perf.framePoints.push(points);
    if (this.perf.frames.length > 5000) {
      this.perf.frames.splice(0, 1000);
      this.perf.framePoints.splice(0, 1000);
    }
    if (this.zoomApplied !== null) {
      this.perf.zooms.push(t1 - this.zoomApplied);
      this.zoomApplied = null;
    }
  }

  /** Points currently shown per chart id (the browser test checks the charts fill). */
  pointCounts(): Record<string, number> {
    const out: Record<string, number> = {};
    for (const c of this.charts) out[c.spec.id] = c.pointCount;
    return out;
  }
}
