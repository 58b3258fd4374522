/** The lineage graph (runs as nodes, parent -> child edges; click selects a run). */
import { layoutLineage } from '../shared/lineage';
import type { RunDto } from '../shared/protocol';
import { clear, h, svg } from './dom';

const NODE_W = 128;
const NODE_H = 34;
const GAP_X = 36;
const GAP_Y = 12;

export function renderLineage(container: HTMLElement, runs: RunDto[], selected: string, onSelect: (runId: string) => void): void {
  clear(container);
  if (!runs.length) {
    container.append(h('div', { className: 'muted' }, 'no runs yet'));
    return;
  }
  const layout = layoutLineage(runs);
  const width = layout.columns * (NODE_W + GAP_X) - GAP_X + 8;
  const height = layout.rows * (NODE_H + GAP_Y) - GAP_Y + 8;
  const root = svg('svg', { width, height, viewBox: `-4 -4 ${width} ${height}`, class: 'lineage-svg', id: 'lineage-svg' });
  const pos = new Map<string, { x: number; y: number }>();
  for (const n of layout.nodes) pos.set(n.runId, { x: n.column * (NODE_W + GAP_X), y: n.row * (NODE_H + GAP_Y) });
  for (const e of layout.edges) {
    const a = pos.get(e.from);
    const b = pos.get(e.to);
    if (!a || !b) continue;
    const x1 = a.x + NODE_W;
    const y1 = a.y + NODE_H / 2;
    const x2 = b.x;
    const y2 = b.y + NODE_H / 2;
    const mx = (x1 + x2) / 2;
    root.append(svg('path', { d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`, class: 'lineage-edge' }));
  }
  const byId = new Map(runs.map((r) => [r.runId, r]));
  for (const n of layout.nodes) {
    const r = byId.get(n.runId) as RunDto;
    const p = pos.get(n.runId) as { x: number; y: number };
    const g = svg('g', { class: `lineage-node status-${r.status}${r.runId === selected ? ' selected' : ''}`, transform: `translate(${p.x},${p.y})`, 'data-run': r.runId });
    const title = svg('title');
    title.textContent = `${r.name} (${r.runId})\nkind: ${r.kind}\nstatus: ${r.status}\nparents: ${r.parents.join(', ') || '—'}`;
    g.append(title);
    g.append(svg('rect', { width: NODE_W, height: NODE_H, rx: 5 }));
    const name = svg('text', { x: 8, y: 14, class: 'lineage-name' });
    name.textContent = r.name.length > 18 ? `${r.name.slice(0, 17)}…` : r.name;
    const sub = svg('text', { x: 8, y: 27, class: 'lineage-sub' });
    sub.textContent = `${r.kind} · ${r.status}`;
    g.append(name, sub);
    g.addEventListener('click', () => onSelect(r.runId));
    root.append(g);
  }
  container.append(root);
}
