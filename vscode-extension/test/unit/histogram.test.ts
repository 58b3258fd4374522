import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  brushToQuantile,
  cumulativeFraction,
  formatQuantile,
  isValidHistogram,
  parseQuantileSpec,
  quantileToLossRange,
  quantileValue,
  totalCount,
  validateSelectSpec,
} from '../../shared/histogram';

// 10 bins over [0, 1), 100 samples each except the tail.
const h = {
  edges: [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
  counts: [100, 100, 100, 100, 100, 100, 100, 100, 100, 100],
};

describe('histogram cumulative counts', () => {
  it('validates its shape', () => {
    assert.ok(isValidHistogram(h));
    assert.ok(!isValidHistogram({ edges: [0, 1], counts: [1, 2] }));
    assert.ok(!isValidHistogram({ edges: [0, 2, 1], counts: [1, 2] }));
    assert.equal(totalCount(h), 1000);
  });

  it('interpolates linearly inside a bin', () => {
    assert.equal(cumulativeFraction(h, -1), 0);
    assert.equal(cumulativeFraction(h, 0), 0);
    assert.ok(Math.abs(cumulativeFraction(h, 0.05) - 0.05) < 1e-12);
    assert.ok(Math.abs(cumulativeFraction(h, 0.85) - 0.85) < 1e-12);
    assert.equal(cumulativeFraction(h, 1), 1);
    assert.equal(cumulativeFraction(h, 7), 1);
  });

  it('quantileValue inverts cumulativeFraction', () => {
    for (const q of [0, 0.1, 0.33, 0.5, 0.9, 0.99, 1]) {
      assert.ok(Math.abs(cumulativeFraction(h, quantileValue(h, q)) - q) < 1e-9, `q=${q}`);
    }
  });

  it('skewed histogram: most mass at low loss', () => {
    const s = { edges: [0, 1, 2, 3, 4], counts: [900, 50, 40, 10] };
    assert.ok(Math.abs(cumulativeFraction(s, 1) - 0.9) < 1e-12);
    assert.ok(Math.abs(cumulativeFraction(s, 3) - 0.99) < 1e-12);
    assert.deepEqual(brushToQuantile(s, 1, 4).spec, 'quantile:0.9:1.0');
    assert.deepEqual(brushToQuantile(s, 3, 10).spec, 'quantile:0.99:1.0');
  });
});

describe('brush -> quantile spec', () => {
  it('turns the brushed tail into quantile:LO:1.0', () => {
    const sel = brushToQuantile(h, 0.85, 1.0);
    assert.equal(sel.spec, 'quantile:0.85:1.0');
    assert.equal(sel.lo, 0.85);
    assert.equal(sel.hi, 1);
    assert.equal(sel.samples, 150);
  });

  it('does not care about brush direction', () => {
    assert.deepEqual(brushToQuantile(h, 0.6, 0.3), brushToQuantile(h, 0.3, 0.6));
    assert.equal(brushToQuantile(h, 0.6, 0.3).spec, 'quantile:0.3:0.6');
  });

  it('widens to whole 1/10000ths so nothing brushed is lost', () => {
    const sel = brushToQuantile(h, 0.123456, 0.654321);
    assert.equal(sel.spec, 'quantile:0.1234:0.6544');
  });

  it('a brush past both ends selects everything', () => {
    assert.equal(brushToQuantile(h, -5, 5).spec, 'quantile:0.0:1.0');
  });

  it('a zero-width brush still gives a valid spec', () => {
    const sel = brushToQuantile(h, 1, 1);
    assert.ok(sel.lo < sel.hi);
    assert.ok(parseQuantileSpec(sel.spec));
  });

  it('the spec round-trips back to the brushed range', () => {
    const sel = brushToQuantile(h, 0.25, 0.75);
    const [a, b] = quantileToLossRange(h, parseQuantileSpec(sel.spec)!);
    assert.ok(Math.abs(a - 0.25) < 1e-9 && Math.abs(b - 0.75) < 1e-9);
  });
});

describe('specs', () => {
  it('formats quantiles like the CLI examples', () => {
    assert.equal(formatQuantile(0.85), '0.85');
    assert.equal(formatQuantile(1), '1.0');
    assert.equal(formatQuantile(0), '0.0');
    assert.equal(formatQuantile(0.12345), '0.1235');
  });

  it('parses quantile specs and rejects bad ranges', () => {
    assert.deepEqual(parseQuantileSpec('quantile:0.85:1.0'), { lo: 0.85, hi: 1 });
    assert.equal(parseQuantileSpec('quantile:0.9:0.5'), null);
    assert.equal(parseQuantileSpec('quantile:0.9:1.5'), null);
    assert.equal(parseQuantileSpec('kmeans:auto'), null);
  });

  it('validates every SPEC form of the CLI', () => {
    for (const ok of ['all', 'quantile:0.85:1.0', 'kmeans:auto', 'kmeans:auto:cluster=2', 'indices:/tmp/ids.txt']) assert.equal(validateSelectSpec(ok), null, ok);
    for (const bad of ['', 'some', 'quantile:1:0', 'kmeans:3', 'indices:']) assert.notEqual(validateSelectSpec(bad), null, bad);
  });
});
