/**
 * Per-sample loss by epoch: a canvas heatmap of one run, x = epoch, y = loss bin,
 * colour = the share of that epoch's samples in the bin (log-ish scale). It asks
 * GetLossDistribution for the latest epoch (which lists the epochs with data), then for
 * every other epoch, and re-bins them all onto common edges (shared/heatmap.ts).
 * Refreshed on `epoch_end` events.
 */
import type { DistributionDto } from '../shared/protocol';
import { type HeatmapGrid, buildHeatmap, heatColor } from '../shared/heatmap';
import { themeColor } from './charts';
import { fmt, h } from './dom';
import type { HostRpc } from './rpc';

const BINS = 40;
/** At most this many epochs (the latest ones) are fetched and drawn. */
const MAX_EPOCHS = 60;
const PAD = { left: 44, right: 8, top: 6, bottom: 18 };

export class HeatmapView {
  readonly el: HTMLElement;
  private readonly canvas: HTMLCanvasElement;
  private readonly note: HTMLElement;
  private run = '';
  private gen = 0;
  private inFlight = false;
  private again = false;
  private grid: HeatmapGrid | null = null;
  /** Cells painted by the last draw (the browser test checks it). */
  cellsDrawn = 0;

  constructor(
    private readonly rpc: HostRpc,
    private readonly onError: (e: unknown) => void,
  ) {
    this.canvas = h('canvas', { id: 'heatmap-canvas', className: 'heatmap-canvas', width: 600, height: 160 });
    this.note = h('div', { className: 'muted', id: 'heatmap-note' }, 'no finished epoch yet');
    this.el = h('div', { className: 'heatmap' }, this.canvas, this.note);
    const ro = new ResizeObserver(() => this.draw());
    ro.observe(this.el);
  }

  get data(): HeatmapGrid | null {
    return this.grid;
  }

  setRun(run: string): void {
    if (run === this.run) return;
    this.run = run;
    this.grid = null;
    this.gen++;
    this.draw();
    void this.refresh();
  }

  clear(): void {
    this.run = '';
    this.grid = null;
    this.gen++;
    this.note.textContent = 'no finished epoch yet';
    this.draw();
  }

  /** Re-query every epoch (coalesces calls that arrive while one is in flight). */
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
      const latest = await this.rpc.call('getLossDistribution', { run, epoch: -1, bins: BINS });
      if (gen !== this.gen) return;
      const epochs = (latest.epochs.length ? latest.epochs : [latest.epoch]).filter((e) => e !== latest.epoch).slice(-(MAX_EPOCHS - 1));
      const rest = await Promise.all(epochs.map((epoch) => this.rpc.call('getLossDistribution', { run, epoch, bins: BINS }).catch(() => null)));
      if (gen !== this.gen) return;
      const dists = [latest, ...rest].filter((d): d is DistributionDto => d !== null);
      this.grid = buildHeatmap(
        dists.map((d) => ({ epoch: d.epoch, edges: d.binEdges, counts: d.counts })),
        BINS,
      );
      this.note.textContent = this.grid
        ? `${this.grid.epochs.length} epoch${this.grid.epochs.length === 1 ? '' : 's'} · loss ${fmt(this.grid.edges[0])} – ${fmt(this.grid.edges[this.grid.edges.length - 1])} · colour: share of the epoch's samples (log scale)`
        : 'no per-sample losses yet';
      this.draw();
    } catch (e) {
      if (gen === this.gen) {
        this.note.textContent = 'no per-sample losses yet';
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

  draw(): void {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const cssW = Math.max(200, c.parentElement ? c.parentElement.clientWidth - 4 : 600);
    const cssH = 160;
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
    const fg = themeColor('--otf-fg-muted', '#9a9a9a');
    ctx.font = '10px sans-serif';
    const g = this.grid;
    this.cellsDrawn = 0;
    if (!g) {
      ctx.fillStyle = fg;
      ctx.fillText('waiting for a finished epoch…', PAD.left, cssH / 2);
      return;
    }
    const w = cssW - PAD.left - PAD.right;
    const hgt = cssH - PAD.top - PAD.bottom;
    const cols = g.epochs.length;
    const bins = g.edges.length - 1;
    const cw = w / cols;
    const ch = hgt / bins;
    for (let x = 0; x < cols; x++) {
      const col = g.fractions[x];
      for (let y = 0; y < bins; y++) {
        const [r, gg, b] = heatColor(col[y]);
        ctx.fillStyle = `rgb(${r},${gg},${b})`;
        // Low losses at the bottom; +0.5 px hides seams between cells.
        ctx.fillRect(PAD.left + x * cw, PAD.top + hgt - (y + 1) * ch, cw + 0.5, ch + 0.5);
        this.cellsDrawn++;
      }
    }
    // Axes: loss on the left (bottom, middle, top), epochs below.
    ctx.fillStyle = fg;
    ctx.textAlign = 'right';
    const lo = g.edges[0];
    const hi = g.edges[bins];
    ctx.fillText(fmt(hi, 3), PAD.left - 4, PAD.top + 8);
    ctx.fillText(fmt((lo + hi) / 2, 3), PAD.left - 4, PAD.top + hgt / 2 + 3);
    ctx.fillText(fmt(lo, 3), PAD.left - 4, PAD.top + hgt);
    ctx.textAlign = 'center';
    const step = Math.max(1, Math.ceil(cols / Math.max(1, Math.floor(w / 36))));
    for (let x = 0; x < cols; x += step) ctx.fillText(String(g.epochs[x]), PAD.left + (x + 0.5) * cw, cssH - 5);
    ctx.textAlign = 'left';
  }
}
