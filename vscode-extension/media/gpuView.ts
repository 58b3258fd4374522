/**
 * GPU utilisation: a compact table of SessionStatus.gpus (utilisation %, memory used /
 * total), refreshed by the dashboard's GetStatus poll. "no GPU (CPU run)" when empty.
 */
import type { GpuDto } from '../shared/protocol';
import { clear, h } from './dom';

/** A small horizontal bar (width through the CSSOM: the CSP forbids inline style attributes). */
function bar(pct: number, cls: string): HTMLElement {
  const fill = h('div', { className: cls });
  fill.style.width = `${pct.toFixed(1)}%`;
  return h('div', { className: 'gpu-bar' }, fill);
}

export class GpuView {
  readonly el = h('div', { id: 'gpu-panel' }, h('div', { className: 'muted' }, 'waiting for the session status…'));

  update(gpus: GpuDto[]): void {
    clear(this.el);
    if (!gpus.length) {
      this.el.append(h('div', { className: 'muted', id: 'gpu-none' }, 'no GPU (CPU run)'));
      return;
    }
    const body = h('tbody');
    for (const g of gpus) {
      const util = Math.max(0, Math.min(100, g.utilization));
      const memPct = g.memoryTotalMb > 0 ? Math.max(0, Math.min(100, (100 * g.memoryUsedMb) / g.memoryTotalMb)) : 0;
      body.append(
        h(
          'tr',
          { 'data-gpu': g.index },
          h('td', { title: g.name }, `${g.index}`, h('span', { className: 'muted' }, ` ${g.name}`)),
          h('td', {}, bar(util, 'gpu-fill'), ` ${util.toFixed(0)}%`),
          h('td', {}, bar(memPct, 'gpu-fill gpu-mem'), ` ${Math.round(g.memoryUsedMb)} / ${Math.round(g.memoryTotalMb)} MiB`),
        ),
      );
    }
    this.el.append(h('table', { className: 'grid-table', id: 'gpu-table' }, h('thead', {}, h('tr', {}, h('th', {}, 'gpu'), h('th', {}, 'util'), h('th', {}, 'memory'))), body));
  }
}
