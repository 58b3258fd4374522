import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { SeriesBuffer, bucketIndex, lowerBound, minMaxDownsample, panRange, pointsForWidth, sliceRange, zoomRange } from '../../shared/downsample';

/** The supervisor's numpy implementation (server.py minmax_downsample), transcribed. */
function reference(steps: number[], vals: number[], maxPoints: number): [number[], number[]] {
  const n = steps.length;
  const buckets = Math.max(1, Math.floor(maxPoints / 2));
  if (n <= maxPoints || buckets >= n) return [steps, vals];
  const edges = Array.from({ length: buckets + 1 }, (_, i) => Math.floor((i * n) / buckets));
  const idx: number[] = [];
  for (let b = 0; b < buckets; b++) {
    const [a, e] = [edges[b], edges[b + 1]];
    if (e <= a) continue;
    let mi = a;
    let ma = a;
    for (let j = a; j < e; j++) {
      if (vals[j] < vals[mi]) mi = j;
      if (vals[j] > vals[ma]) ma = j;
    }
    idx.push(...[...new Set([mi, ma])].sort((x, y) => x - y));
  }
  return [idx.map((i) => steps[i]), idx.map((i) => vals[i])];
}

function noisy(n: number, seed = 1): number[] {
  let s = seed;
  return Array.from({ length: n }, (_, i) => {
    s = (s * 16807) % 2147483647;
    return Math.exp(-i / n) + (s / 2147483647 - 0.5) * 0.1;
  });
}

describe('bucketing', () => {
  it('bucketIndex covers [from, to] with clamping', () => {
    assert.equal(bucketIndex(0, 0, 100, 10), 0);
    assert.equal(bucketIndex(9.99, 0, 100, 10), 0);
    assert.equal(bucketIndex(10, 0, 100, 10), 1);
    assert.equal(bucketIndex(100, 0, 100, 10), 9);
    assert.equal(bucketIndex(-5, 0, 100, 10), 0);
    assert.equal(bucketIndex(500, 0, 100, 10), 9);
    assert.equal(bucketIndex(5, 3, 3, 10), 0);
  });

  it('lowerBound and sliceRange find step ranges', () => {
    const steps = [1, 2, 4, 8, 16];
    assert.equal(lowerBound(steps, 0), 0);
    assert.equal(lowerBound(steps, 4), 2);
    assert.equal(lowerBound(steps, 5), 3);
    assert.equal(lowerBound(steps, 99), 5);
    assert.deepEqual(sliceRange({ steps, values: [1, 2, 3, 4, 5] }, 2, 8), { steps: [2, 4, 8], values: [2, 3, 4] });
    assert.deepEqual(sliceRange({ steps, values: [1, 2, 3, 4, 5] }, 9, Infinity).steps, [16]);
  });
});

describe('minMaxDownsample', () => {
  it('returns short series unchanged', () => {
    const s = { steps: [1, 2, 3], values: [3, 1, 2] };
    assert.deepEqual(minMaxDownsample(s, 10), s);
  });

  it('matches the supervisor min/max-per-bucket scheme exactly', () => {
    for (const [n, mp] of [[1000, 100], [1001, 37], [5000, 640], [10, 4], [333, 332]]) {
      const steps = Array.from({ length: n }, (_, i) => i + 1);
      const vals = noisy(n, n);
      const got = minMaxDownsample({ steps, values: vals }, mp);
      const [rs, rv] = reference(steps, vals, mp);
      assert.deepEqual(got.steps, rs, `steps n=${n} max=${mp}`);
      assert.deepEqual(got.values, rv, `values n=${n} max=${mp}`);
      assert.ok(got.steps.length <= mp, 'never more than maxPoints');
    }
  });

  it('keeps a single spike, with the steps still increasing', () => {
    const n = 10_000;
    const steps = Array.from({ length: n }, (_, i) => i);
    const values = steps.map((i) => (i === 7777 ? 50 : 1 + (i % 7) * 0.01));
    const d = minMaxDownsample({ steps, values }, 200);
    assert.ok(d.values.includes(50), 'the spike survives');
    assert.ok(d.steps.includes(7777));
    for (let i = 1; i < d.steps.length; i++) assert.ok(d.steps[i] > d.steps[i - 1]);
  });

  it('keeps gaps visible: an all-null bucket contributes one null point', () => {
    const steps = Array.from({ length: 100 }, (_, i) => i);
    const values: (number | null)[] = steps.map((i) => (i >= 40 && i < 60 ? null : i));
    const d = minMaxDownsample({ steps, values }, 20);
    assert.ok(d.values.includes(null));
  });
});

describe('SeriesBuffer', () => {
  it('appends only newer steps (replays after a reconnect are harmless)', () => {
    const b = new SeriesBuffer(100);
    b.reset({ steps: [1, 2, 3], values: [1, 1, 1] }, 3);
    assert.equal(b.push(3, 9), false);
    assert.equal(b.push(2, 9), false);
    assert.equal(b.push(4, 2), true);
    assert.deepEqual(b.steps, [1, 2, 3, 4]);
    assert.equal(b.total, 4);
  });

  it('compacts itself past capacity and keeps the extremes', () => {
    const b = new SeriesBuffer(1000);
    for (let i = 1; i <= 5000; i++) b.push(i, i === 2500 ? -100 : Math.sin(i));
    assert.ok(b.length <= 1000, `length ${b.length}`);
    assert.ok(b.values.includes(-100));
    assert.equal(b.lastStep, 5000);
    assert.equal(b.total, 5000);
  });
});

describe('zoom and pan', () => {
  it('zooms around the anchor', () => {
    assert.deepEqual(zoomRange(0, 100, 50, 0.5), [25, 75]);
    assert.deepEqual(zoomRange(0, 100, 0, 0.5), [0, 50]);
  });

  it('never zooms narrower than 2 steps, nor past the data', () => {
    const [a, b] = zoomRange(10, 11, 10.5, 0.1);
    assert.ok(b - a >= 2);
    assert.deepEqual(zoomRange(0, 100, 50, 4, 0, 100), [0, 100]);
  });

  it('pans keeping the width, clamped to the data', () => {
    assert.deepEqual(panRange(10, 20, 5), [15, 25]);
    assert.deepEqual(panRange(10, 20, 100, 0, 50), [40, 50]);
    assert.deepEqual(panRange(10, 20, -100, 0, 50), [0, 10]);
  });

  it('asks for about one point per device pixel, within bounds', () => {
    assert.equal(pointsForWidth(600), 600);
    assert.equal(pointsForWidth(600, 2), 1200);
    assert.equal(pointsForWidth(600, 3), 1200);
    assert.equal(pointsForWidth(10), 50);
    assert.equal(pointsForWidth(100_000), 4000);
  });
});
