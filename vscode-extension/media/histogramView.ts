/**
 * The live per-sample loss histogram of one run and epoch (GetLossDistribution), with
 * p50/p90/p99 markers and a per-epoch quantile table fed by `samples` events. Dragging
 * across it brushes a loss range; the range becomes a `quantile:LO:HI` selection (from
 * the histogram's cumulative counts) that fills the fork form.
 */
import type { DistributionDto } from '../shared/protocol';
import { type Histogram, type QuantileSelection, brushToQuantile, isValidHistogram, parseQuantileSpec, quantileToLossRange } from '../shared/histogram';
import { themeColor } from './charts';
import { clear, fmt, fmtInt, h } from './dom';
import type { HostRpc } from './rpc';

export interface EpochQuantiles {
  epoch: number;
  p50: number | null;
  p90: number | null;
  p99: number | null;
  mean: number | null;
  seen: number;
}

const PAD = { left: 8, right: 8, top: 14, bottom: 20 };

export class HistogramView {
  readonly el: HTMLElement;
  private readonly canvas: HTMLCanvasElement;
  private readonly stats: HTMLElement;
  private readonly epochSelect: HTMLSelectElement;
  private readonly epochTable: HTMLTableSectionElement;
  private readonly brushInfo: HTMLElement;
  private dist: DistributionDto | null = null;
  private run = '';
  /** -1 = follow the latest epoch with data. */
  private epoch = -1;
  private brush: [number, number] | null = null;
  private dragging = false;
  private gen = 0;
  private inFlight = false;
  private again = false;
  private readonly perEpoch = new Map<string, Map<number, EpochQuantiles>>();

  constructor(
    private readonly rpc: HostRpc,
    private readonly onSelect: (sel: QuantileSelection) => void,
    private readonly onError: (e: unknown) => void,
  ) {
    this.canvas = h('canvas', { id: 'hist-canvas', className: 'hist-canvas', width: 600, height: 180 });
    this.stats = h('div', { className: 'hist-stats', id: 'hist-stats' }, 'no per-sample losses yet');
    this.brushInfo = h('div', { className: 'muted', id: 'hist-brush' }, 'drag across the histogram to select a loss range');
    this.epochSelect = h('select', { id: 'hist-epoch', onchange: () => this.setEpoch(Number(this.epochSelect.value)) });
    this.epochSelect.append(new Option('latest', '-1'));
    this.epochTable = h('tbody');
    this.el = h(
      'div',
      { className: 'hist' },
      h('div', { className: 'row' }, h('label', {}, 'epoch ', this.epochSelect), this.stats),
      this.canvas,
      this.brushInfo,
      h(
        'details',
        { className: 'epoch-quantiles' },
        h('summary', {}, 'quantiles per epoch'),
        h('table', { className: 'grid-table', id: 'hist-epochs' }, h('thead', {}, h('tr', {}, h('th', {}, 'epoch'), h('th', {}, 'seen'), h('th', {}, 'mean'), h('th', {}, 'p50'), h('th', {}, 'p90'), h('th', {}, 'p99'))), this.epochTable),
      ),
    );
    this.canvas.addEventListener('pointerdown', (e) => this.pointer(e, 'down'));
    this.canvas.addEventListener('pointermove', (e) => this.pointer(e, 'move'));
    this.canvas.addEventListener('pointerup', (e) => this.pointer(e, 'up'));
    this.canvas.addEventListener('dblclick', () => {
      this.brush = null;
      this.draw();
    });
    new ResizeObserver(() => this.draw()).observe(this.el);
  }

  get distribution(): DistributionDto | null {
    return this.dist;
  }

  setRun(run: string): void {
    if (run === this.run) return;
    this.run = run;
    this.epoch = -1;
    this.dist = null;
    this.brush = null;
    this.renderEpochTable();
    void this.refresh();
  }

  setEpoch(epoch: number): void {
    this.epoch = epoch;
    void this.refresh();
  }

  clear(): void {
    this.run = '';
    this.dist = null;
    this.brush = null;
    this.perEpoch.clear();
    this.renderEpochTable();
    this.stats.textContent = 'no per-sample losses yet';
    this.draw();
  }

  /** Quantiles from a `samples` event (per epoch, live). */
  noteSamples(runId: string, q: EpochQuantiles): void {
    let m = this.perEpoch.get(runId);
    if (!m) this.perEpoch.set(runId, (m = new Map()));
    m.set(q.epoch, q);
    if (runId === this.run) this.renderEpochTable();
  }

  /** Re-query the distribution (coalesces calls that arrive while one is in flight). */
  async refresh(): Promise<void> {
    if (!this.run) return;
    if (this.inFlight) {
      this.again = true;
      return;
    }
    this.inFlight = true;
    const gen = ++this.gen;
    const run = this.run;
    try {
      const d = await this.rpc.call('getLossDistribution', { run, epoch: this.epoch, bins: 60 });
      if (gen !== this.gen || run !== this.run) return;
      this.dist = d;
      this.updateEpochs(d.epochs);
      if (d.p50 !== null || d.seen > 0) {
        this.noteSamples(run, { epoch: d.epoch, p50: d.p50, p90: d.p90, p99: d.p99, mean: d.mean, seen: d.seen });
      }
      this.stats.textContent =
        d.seen > 0
          ? `epoch ${d.epoch} · ${fmtInt(d.seen)}/${fmtInt(d.total)} samples · mean ${fmt(d.mean)} · p50 ${fmt(d.p50)} · p90 ${fmt(d.p90)} · p99 ${fmt(d.p99)}`
          : 'no per-sample losses yet';
      this.draw();
    } catch (e) {
      if (gen === this.gen) {
        this.stats.textContent = `no distribution: ${e instanceof Error ? e.message : String(e)}`;
        this.onError(e);
      }
    } finally {
      this.inFlight = false;
      if (this.again) {
        this.again = false;
        void this.refresh();
      }
    }
  }

  /** Draws the brush for a typed selection (quantile specs only). */
  showSpec(spec: string): void {
    const q = parseQuantileSpec(spec);
    const hist = this.histogram();
    if (!q || !hist) return;
    this.brush = quantileToLossRange(hist, q);
    this.draw();
  }

  /** Programmatic brush (the browser test drives the same path as the mouse). */
  brushLoss(lo: number, hi: number): QuantileSelection | null {
    const hist = this.histogram();
    if (!hist) return null;
    this.brush = [lo, hi];
    this.draw();
    const sel = brushToQuantile(hist, lo, hi);
    this.announce(sel);
    return sel;
  }

  private histogram(): Histogram | null {
    if (!this.dist) return null;
    const hist = { edges: this.dist.binEdges, counts: this.dist.counts };
    return isValidHistogram(hist) ? hist : null;
  }

  private updateEpochs(epochs: number[]): void {
    const want = ['-1', ...epochs.map(String)];
    const have = Array.from(this.epochSelect.options).map((o) => o.value);
    if (want.join(',') === have.join(',')) return;
    const value = this.epochSelect.value;
    clear(this.epochSelect);
    this.epochSelect.append(new Option('latest', '-1'));
    for (const e of epochs) this.epochSelect.append(new Option(String(e), String(e)));
    this.epochSelect.value = want.includes(value) ? value : '-1';
  }

  private renderEpochTable(): void {
    clear(this.epochTable);
    const m = this.perEpoch.get(this.run);
    if (!m) return;
    for (const q of [...m.values()].sort((a, b) => a.epoch - b.epoch)) {
      this.epochTable.append(h('tr', {}, h('td', {}, q.epoch), h('td', {}, fmtInt(q.seen)), h('td', {}, fmt(q.mean)), h('td', {}, fmt(q.p50)), h('td', {}, fmt(q.p90)), h('td', {}, fmt(q.p99))));
    }
  }

  private xToLoss(clientX: number): number | null {
    const hist = this.histogram();
    if (!hist) return null;
    const rect = this.canvas.getBoundingClientRect();
    const w = rect.width - PAD.left - PAD.right;
    const f = Math.min(1, Math.max(0, (clientX - rect.left - PAD.left) / w));
    const lo = hist.edges[0];
    const hi = hist.edges[hist.edges.length - 1];
    return lo + f * (hi - lo);
  }

  private pointer(e: PointerEvent, what: 'down' | 'move' | 'up'): void {
    const x = this.xToLoss(e.clientX);
    if (x === null) return;
    if (what === 'down') {
      this.dragging = true;
      this.canvas.setPointerCapture(e.pointerId);
      this.brush = [x, x];
    } else if (this.dragging && this.brush) {
      this.brush = [this.brush[0], x];
      if (what === 'up') {
        this.dragging = false;
        const hist = this.histogram();
        if (hist && Math.abs(this.brush[1] - this.brush[0]) > 0) this.announce(brushToQuantile(hist, this.brush[0], this.brush[1]));
      }
    }
    this.draw();
  }

  private announce(sel: QuantileSelection): void {
    this.brushInfo.textContent = `selected ${sel.spec} (≈${fmtInt(sel.samples)} samples)`;
    this.onSelect(sel);
  }

  draw(): void {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const cssW = Math.max(200, c.parentElement ? c.parentElement.clientWidth - 4 : 600);
    const cssH = 180;
    if (c.width !== Math.round(cssW * dpr) || c.height !== Math.round(cssH * dpr)) {
      c.width = Math.round(cssW * dpr);
      c.height = Math.round(cssH * dpr);
      c.style.width = `${cssW}px`;
      c.style.height = `${cssH}px`;
    }
    const ctx = c.getContext('2d');
    if (!ctx) return;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    const hist = this.histogram();
    const fg = themeColor('--otf-fg-muted', '#9a9a9a');
    ctx.font = '10px sans-serif';
    if (!hist || hist.counts.every((n) => n === 0)) {
      ctx.fillStyle = fg;
      ctx.fillText('waiting for per-sample losses…', PAD.left, cssH / 2);
      return;
    }
    const w = cssW - PAD.left - PAD.right;
    const hgt = cssH - PAD.top - PAD.bottom;
    const lo = hist.edges[0];
    const hi = hist.edges[hist.edges.length - 1];
    const span = hi - lo || 1;
    const xOf = (v: number): number => PAD.left + ((v - lo) / span) * w;
    const maxCount = Math.max(...hist.counts, 1);
    ctx.fillStyle = themeColor('--otf-accent', '#4e9bff');
    for (let i = 0; i < hist.counts.length; i++) {
      const x0 = xOf(hist.edges[i]);
      const x1 = xOf(hist.edges[i + 1]);
      const bh = (hist.counts[i] / maxCount) * hgt;
      ctx.fillRect(x0, PAD.top + hgt - bh, Math.max(1, x1 - x0 - 1), bh);
    }
    if (this.brush) {
      const a = xOf(Math.min(...this.brush));
      const b = xOf(Math.max(...this.brush));
      ctx.fillStyle = 'rgba(255, 200, 60, 0.25)';
      ctx.fillRect(a, PAD.top, Math.max(1, b - a), hgt);
      ctx.strokeStyle = 'rgba(255, 200, 60, 0.9)';
      ctx.strokeRect(a, PAD.top, Math.max(1, b - a), hgt);
    }
    const d = this.dist as DistributionDto;
    const marks: [string, number | null, string][] = [
      ['p50', d.p50, '#3ccf7a'],
      ['p90', d.p90, '#e5c07b'],
      ['p99', d.p99, '#ff5f6d'],
    ];
    for (const [label, v, color] of marks) {
      if (v === null) continue;
      const x = xOf(v);
      ctx.strokeStyle = color;
      ctx.beginPath();
      ctx.moveTo(x, PAD.top);
      ctx.lineTo(x, PAD.top + hgt);
      ctx.stroke();
      ctx.fillStyle = color;
      ctx.fillText(label, Math.min(x + 2, cssW - 24), PAD.top - 3);
    }
    ctx.fillStyle = fg;
    ctx.fillText(fmt(lo, 3), PAD.left, cssH - 6);
    const hiText = fmt(hi, 3);
    ctx.fillText(hiText, cssW - PAD.right - ctx.measureText(hiText).width, cssH - 6);
    ctx.fillText('loss', cssW / 2 - 10, cssH - 6);
  }
}
