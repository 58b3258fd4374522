import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { layoutLineage, relatives } from '../../shared/lineage';

describe('lineage layout', () => {
  const runs = [
    { runId: 'main', parents: [], created: 1 },
    { runId: 'fork-1', parents: ['main'], created: 2 },
    { runId: 'fork-2', parents: ['main'], created: 3 },
    { runId: 'moe-1', parents: ['main', 'fork-1', 'fork-2'], created: 4 },
    { runId: 'orphan', parents: ['elsewhere'], created: 5 },
  ];

  it('puts each run one column right of its deepest parent', () => {
    const l = layoutLineage(runs);
    const col = Object.fromEntries(l.nodes.map((n) => [n.runId, n.column]));
    assert.deepEqual(col, { main: 0, 'fork-1': 1, 'fork-2': 1, 'moe-1': 2, orphan: 0 });
    assert.equal(l.columns, 3);
    assert.equal(l.rows, 2);
    assert.equal(l.edges.length, 5, 'unknown parents make no edge');
  });

  it('survives a cycle (a supervisor bug) without recursing forever', () => {
    const l = layoutLineage([
      { runId: 'a', parents: ['b'], created: 1 },
      { runId: 'b', parents: ['a'], created: 2 },
    ]);
    assert.equal(l.nodes.length, 2);
  });

  it('lists parents and children', () => {
    assert.deepEqual(relatives(runs, 'main'), { parents: [], children: ['fork-1', 'fork-2', 'moe-1'] });
    assert.deepEqual(relatives(runs, 'moe-1'), { parents: ['main', 'fork-1', 'fork-2'], children: [] });
  });
});
