import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { buildHeatmap, commonEdges, heatColor, logScale, rebin } from '../../shared/heatmap';

const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
const close = (a: number, b: number, eps = 1e-9) => assert.ok(Math.abs(a - b) <= eps, `${a} != ${b}`);

describe('rebin', () => {
  it('returns the counts unchanged for identical edges', () => {
    const edges = [0, 1, 2, 3];
    assert.deepEqual(rebin({ edges, counts: [5, 0, 7] }, edges), [5, 0, 7]);
  });

  it('splits a bin by overlap and preserves the total', () => {
    const out = rebin({ edges: [0, 2], counts: [10] }, [0, 0.5, 1, 1.5, 2]);
    assert.deepEqual(out, [2.5, 2.5, 2.5, 2.5]);
    const fine = rebin({ edges: [0, 1, 2, 3, 4], counts: [1, 2, 3, 4] }, [0, 2, 4]);
    assert.deepEqual(fine, [3, 7]);
  });

  it('folds mass outside the target range into the edge bins', () => {
    const out = rebin({ edges: [-2, 0, 1, 5], counts: [4, 6, 8] }, [0, 0.5, 1]);
    close(sum(out), 18);
    assert.equal(out[0], 4 + 3);
    assert.equal(out[1], 3 + 8);
  });

  it('puts a zero-width bin where its value falls and ignores bad input', () => {
    assert.deepEqual(rebin({ edges: [0.7, 0.7], counts: [3] }, [0, 0.5, 1]), [0, 3]);
    assert.deepEqual(rebin({ edges: [1, 0], counts: [3] }, [0, 0.5, 1]), [0, 0]);
    assert.deepEqual(rebin({ edges: [0, 1], counts: [3] }, [0]), []);
  });
});

describe('commonEdges / buildHeatmap', () => {
  it('spans every non-empty histogram with equal-width bins', () => {
    const e = commonEdges([{ edges: [1, 2, 3], counts: [1, 1] }, { edges: [0, 0.5], counts: [2] }, { edges: [-9, 99], counts: [0] }], 4);
    assert.deepEqual(e, [0, 0.75, 1.5, 2.25, 3]);
    assert.equal(commonEdges([{ edges: [0, 1], counts: [0] }], 4), null);
    const flat = commonEdges([{ edges: [2, 2], counts: [5] }], 2);
    assert.ok(flat && flat[2] > flat[0]);
  });

  it('builds per-epoch columns of fractions on common edges, epochs ascending', () => {
    const g = buildHeatmap(
      [
        { epoch: 2, edges: [0, 1], counts: [4] },
        { epoch: 0, edges: [0, 2, 4], counts: [1, 3] },
        { epoch: 1, edges: [0, 1], counts: [0] },
      ],
      2,
    );
    assert.ok(g);
    assert.deepEqual(g.edges, [0, 2, 4]);
    assert.deepEqual(g.epochs, [0, 2]);
    assert.deepEqual(g.fractions[0], [0.25, 0.75]);
    assert.deepEqual(g.fractions[1], [1, 0]);
    for (const col of g.fractions) close(sum(col), 1);
    assert.equal(buildHeatmap([], 10), null);
  });
});

describe('colour scale', () => {
  it('is log-ish: 0 -> 0, 1 -> 1, monotonic, stretches small fractions', () => {
    assert.equal(logScale(0), 0);
    assert.equal(logScale(-1), 0);
    assert.equal(logScale(Number.NaN), 0);
    assert.equal(logScale(1), 1);
    assert.equal(logScale(2), 1);
    let prev = 0;
    for (const f of [1e-4, 1e-3, 1e-2, 0.1, 0.5, 0.9]) {
      const t = logScale(f);
      assert.ok(t > prev && t < 1);
      prev = t;
    }
    assert.ok(logScale(0.01) > 0.3, 'a 1% bin is clearly visible');
  });

  it('maps to rgb from dark to bright', () => {
    const lum = ([r, g, b]: number[]) => 0.2126 * r + 0.7152 * g + 0.0722 * b;
    const lo = heatColor(0);
    const hi = heatColor(1);
    assert.deepEqual(lo, [22, 22, 38]);
    assert.deepEqual(hi, [253, 231, 37]);
    for (const c of [heatColor(0.001), heatColor(0.2), heatColor(5), heatColor(Number.NaN)]) {
      assert.equal(c.length, 3);
      for (const v of c) assert.ok(Number.isInteger(v) && v >= 0 && v <= 255);
    }
    assert.ok(lum(heatColor(0.3)) > lum(heatColor(0.01)) && lum(heatColor(0.01)) > lum(lo));
  });
});
