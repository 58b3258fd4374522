/**
 * Layout of the lineage DAG (runs and their parents) for the graph view: a run's column
 * is the length of the longest parent chain above it, rows keep creation order inside a
 * column. Unknown parents (a run from another session) are ignored.
 */

export interface LineageNode {
  runId: string;
  parents: string[];
  created: number;
}

export interface PlacedNode {
  runId: string;
  column: number;
  row: number;
}

export interface LineageLayout {
  nodes: PlacedNode[];
  edges: { from: string; to: string }[];
  columns: number;
  rows: number;
}

export function layoutLineage(runs: LineageNode[]): LineageLayout {
  const byId = new Map(runs.map((r) => [r.runId, r]));
  const depth = new Map<string, number>();
  const visiting = new Set<string>();

  const depthOf = (id: string): number => {
    const known = depth.get(id);
    if (known !== undefined) return known;
    if (visiting.has(id)) return 0; // a cycle would be a supervisor bug; do not recurse forever
    visiting.add(id);
    const run = byId.get(id);
    let d = 0;
    for (const p of run?.parents ?? []) if (byId.has(p)) d = Math.max(d, depthOf(p) + 1);
    visiting.delete(id);
    depth.set(id, d);
    return d;
  };

  const ordered = runs.slice().sort((a, b) => a.created - b.created || a.runId.localeCompare(b.runId));
  const rowsInColumn = new Map<number, number>();
  const nodes: PlacedNode[] = [];
  for (const r of ordered) {
    const column = depthOf(r.runId);
    const row = rowsInColumn.get(column) ?? 0;
    rowsInColumn.set(column, row + 1);
    nodes.push({ runId: r.runId, column, row });
  }
  const edges: { from: string; to: string }[] = [];
  for (const r of ordered) for (const p of r.parents) if (byId.has(p)) edges.push({ from: p, to: r.runId });
  return {
    nodes,
    edges,
    columns: nodes.reduce((m, n) => Math.max(m, n.column + 1), 0),
    rows: Math.max(0, ...rowsInColumn.values()),
  };
}

/** Parents and children of a run (the "click to select" detail line). */
export function relatives(runs: LineageNode[], runId: string): { parents: string[]; children: string[] } {
  const self = runs.find((r) => r.runId === runId);
  return {
    parents: self ? self.parents.slice() : [],
    children: runs.filter((r) => r.parents.includes(runId)).map((r) => r.runId),
  };
}
