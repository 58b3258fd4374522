/**
 * shared/fork.ts: the race fields of a fork (variants, lr multipliers, eta, metric, mode)
 * and its early-stopping fields (patience, metric, min delta, every), checked the CLI's and
 * the supervisor's way, and parsed from the dashboard's fork form.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  EARLY_STOP_NEEDS_PATIENCE,
  type ForkEarlyStop,
  type ForkEarlyStopForm,
  type ForkRaceForm,
  RACE_NEEDS_VARIANTS,
  earlyStopCadence,
  effectiveBudget,
  forkEarlyStopFromForm,
  forkRaceFromForm,
  parseLrMuls,
  validateForkEarlyStop,
  validateForkRace,
} from '../../shared/fork';

const form = (over: Partial<ForkRaceForm> = {}): ForkRaceForm => ({ variants: '1', eta: '', metric: '', mode: '', lrMuls: '', ...over });

describe('fork race: validateForkRace', () => {
  it('accepts no race, a spread race and an explicit race', () => {
    assert.equal(validateForkRace({}), null);
    assert.equal(validateForkRace({ variants: 1 }), null);
    assert.equal(validateForkRace({ variants: 16, raceEta: 8, raceMetric: 'val', raceMode: 'sync' }), null);
    assert.equal(validateForkRace({ variants: 2, raceEta: 2, raceMetric: 'slice', raceMode: 'asha' }), null);
    assert.equal(validateForkRace({ variantLrMuls: [0.3, 1, 3], raceEta: 3 }), null);
    assert.equal(validateForkRace({ variants: 3, variantLrMuls: [0.3, 1, 3] }), null);
  });

  const bad: [string, Parameters<typeof validateForkRace>[0], RegExp][] = [
    ['0 variants', { variants: 0 }, /variants must be an integer in 1\.\.16/],
    ['17 variants', { variants: 17 }, /1\.\.16/],
    ['fractional variants', { variants: 2.5 }, /integer/],
    ['eta without a race', { variants: 1, raceEta: 3 }, /^race options need 2 or more variants$/],
    ['metric without a race', { raceMetric: 'val' }, /^race options need 2 or more variants$/],
    ['mode without a race', { variants: 1, raceMode: 'sync' }, /^race options need 2 or more variants$/],
    ['eta 1', { variants: 4, raceEta: 1 }, /race eta must be an integer in 2\.\.8/],
    ['eta 9', { variants: 4, raceEta: 9 }, /2\.\.8/],
    ['fractional eta', { variants: 4, raceEta: 2.5 }, /2\.\.8/],
    ['unknown metric', { variants: 4, raceMetric: 'train' as never }, /compare on must be one of slice, val/],
    ['unknown mode', { variants: 4, raceMode: 'hyperband' as never }, /race mode must be one of asha, sync/],
    ['one multiplier', { variantLrMuls: [0.5] }, /2\.\.16 of them/],
    ['17 multipliers', { variantLrMuls: Array.from({ length: 17 }, () => 1) }, /2\.\.16 of them.*got 17/],
    ['a zero multiplier', { variantLrMuls: [0.5, 0] }, /lr multiplier 0: each must be a positive number/],
    ['a negative multiplier', { variantLrMuls: [-1, 2] }, /positive/],
    ['an infinite multiplier', { variantLrMuls: [1, Infinity] }, /positive/],
    ['variants disagreeing with the multipliers', { variants: 4, variantLrMuls: [0.5, 2] }, /variants 4 but 2 lr multipliers/],
  ];
  for (const [name, race, re] of bad) {
    it(`rejects ${name}`, () => {
      const err = validateForkRace(race);
      assert.ok(err && re.test(err), `${name}: got ${err}`);
    });
  }
  it('says race options need 2 or more variants, like the CLI', () => {
    assert.equal(RACE_NEEDS_VARIANTS, 'race options need 2 or more variants');
  });
});

describe('fork race: the dashboard form', () => {
  it('parses lr multiplier lists', () => {
    assert.deepEqual(parseLrMuls(''), []);
    assert.deepEqual(parseLrMuls(' 0.3, 1,3e0 ;  10 '), [0.3, 1, 3, 10]);
    assert.deepEqual(parseLrMuls('0.5 2'), [0.5, 2]);
    assert.match((parseLrMuls('0.5, x') as { error: string }).error, /"x": each must be a positive number/);
    assert.match((parseLrMuls('0.5, -2') as { error: string }).error, /"-2"/);
    assert.match((parseLrMuls('1, Infinity') as { error: string }).error, /Infinity/);
  });

  it('one variant: no race fields', () => {
    assert.deepEqual(forkRaceFromForm(form()), { race: { variants: 1 } });
  });

  it('a spread race sends every race field the form shows', () => {
    assert.deepEqual(forkRaceFromForm(form({ variants: '4', eta: '3', metric: 'val', mode: 'sync' })), {
      race: { variants: 4, raceEta: 3, raceMetric: 'val', raceMode: 'sync' },
    });
  });

  it('explicit lr multipliers set the number of variants', () => {
    assert.deepEqual(forkRaceFromForm(form({ variants: '2', eta: '2', metric: 'slice', mode: 'asha', lrMuls: '0.25, 0.5, 1' })), {
      race: { variants: 3, variantLrMuls: [0.25, 0.5, 1], raceEta: 2, raceMetric: 'slice', raceMode: 'asha' },
    });
  });

  const bad: [string, Partial<ForkRaceForm>, RegExp][] = [
    ['empty variants', { variants: '' }, /variants "": must be an integer in 1\.\.16/],
    ['0 variants', { variants: '0' }, /1\.\.16/],
    ['17 variants', { variants: '17', eta: '2' }, /1\.\.16/],
    ['fractional variants', { variants: '2.5' }, /variants "2\.5"/],
    ['eta 9', { variants: '4', eta: '9' }, /race eta must be an integer in 2\.\.8/],
    ['eta 1.5', { variants: '4', eta: '1.5' }, /race eta "1\.5"/],
    ['an unknown metric', { variants: '4', metric: 'loss' }, /compare on must be one of slice, val/],
    ['an unknown mode', { variants: '4', mode: 'fast' }, /race mode must be one of asha, sync/],
    ['race options with one variant', { variants: '1', eta: '3' }, /^race options need 2 or more variants$/],
    ['one lr multiplier', { variants: '3', lrMuls: '0.5' }, /2\.\.16 of them.*got 1/],
    ['a bad lr multiplier', { variants: '3', lrMuls: '0.5, 0' }, /"0": each must be a positive number/],
  ];
  for (const [name, over, re] of bad) {
    it(`rejects ${name}`, () => {
      const r = forkRaceFromForm(form(over));
      assert.ok('error' in r && re.test(r.error), `${name}: got ${JSON.stringify(r)}`);
    });
  }
});

describe('fork early stopping: validateForkEarlyStop (the supervisor\'s rules)', () => {
  it('accepts off, the defaults and every option', () => {
    assert.equal(validateForkEarlyStop({}), null);
    assert.equal(validateForkEarlyStop({}, 30), null);
    // What the relay sends for "off": 0 / '' are "not given", as the supervisor reads them.
    assert.equal(validateForkEarlyStop({ earlyStopPatience: 0, earlyStopMetric: '' as never, earlyStopMinDelta: 0, earlyStopEvery: 0 }, 30), null);
    assert.equal(validateForkEarlyStop({ earlyStopPatience: 3 }, 300), null);
    assert.equal(validateForkEarlyStop({ earlyStopPatience: 2, earlyStopMetric: 'val', earlyStopMinDelta: 0.001, earlyStopEvery: 5 }, 30), null);
    assert.equal(validateForkEarlyStop({ earlyStopPatience: 1_000_000, earlyStopEvery: 1 }, 10_000_000), null);
    // Without a budget the cadence check is left out (the other rules still apply).
    assert.equal(validateForkEarlyStop({ earlyStopPatience: 50, earlyStopEvery: 100 }), null);
  });

  it('uses the supervisor\'s budget and cadence defaults (300 steps; max(1, budget / 10))', () => {
    assert.equal(effectiveBudget(0), 300);
    assert.equal(effectiveBudget(-5), 300);
    assert.equal(effectiveBudget(30.7), 30);
    assert.equal(earlyStopCadence(300), 30);
    assert.equal(earlyStopCadence(30), 3);
    assert.equal(earlyStopCadence(7), 1);
    assert.equal(earlyStopCadence(300, 7), 7);
    // patience 9 every 30 steps: 270 < 300 stops in time; patience 10: 300 >= 300 cannot.
    assert.equal(validateForkEarlyStop({ earlyStopPatience: 9 }, 0), null);
    assert.match(validateForkEarlyStop({ earlyStopPatience: 10 }, 0) ?? '', /every 30 steps cannot stop a 300-step fork/);
    // budget 7: one evaluation per step; patience 6 stops before the end, 7 cannot.
    assert.equal(validateForkEarlyStop({ earlyStopPatience: 6 }, 7), null);
    assert.match(validateForkEarlyStop({ earlyStopPatience: 7 }, 7) ?? '', /every 1 steps cannot stop a 7-step fork/);
  });

  const bad: [string, ForkEarlyStop, number | undefined, RegExp][] = [
    ['a negative patience', { earlyStopPatience: -1 }, 300, /^early-stop patience -1: must be an integer in 0\.\.1000000 \(0 = off\)$/],
    ['a patience over 1000000', { earlyStopPatience: 1_000_001 }, 300, /0\.\.1000000/],
    ['a fractional patience', { earlyStopPatience: 2.5 }, 300, /early-stop patience 2\.5: must be an integer/],
    ['a NaN patience', { earlyStopPatience: NaN }, 300, /early-stop patience NaN/],
    ['a metric without a patience', { earlyStopMetric: 'val' }, 300, /^early-stop metric\/min delta\/every need a patience N \(N >= 1\)$/],
    ['slice given without a patience (like the CLI)', { earlyStopPatience: 0, earlyStopMetric: 'slice' }, 300, /need a patience/],
    ['a min delta without a patience', { earlyStopMinDelta: 0.01 }, 300, /need a patience/],
    ['every without a patience', { earlyStopPatience: 0, earlyStopEvery: 10 }, 300, /need a patience/],
    ['an unknown metric', { earlyStopPatience: 3, earlyStopMetric: 'train' as never }, 300, /^early-stop metric "train": one of slice, val$/],
    ['a negative min delta', { earlyStopPatience: 3, earlyStopMinDelta: -0.1 }, 300, /^early-stop min delta -0\.1: must be a finite number >= 0$/],
    ['an infinite min delta', { earlyStopPatience: 3, earlyStopMinDelta: Infinity }, 300, /min delta Infinity: must be a finite number/],
    ['a negative every', { earlyStopPatience: 3, earlyStopEvery: -5 }, 300, /^early-stop every -5: must be an integer number of steps >= 1 \(0 = budget \/ 10\)$/],
    ['a fractional every', { earlyStopPatience: 3, earlyStopEvery: 2.5 }, 300, /early-stop every 2\.5/],
    ['every longer than the budget', { earlyStopPatience: 1, earlyStopEvery: 40 }, 30, /^early-stop patience 1 with an evaluation every 40 steps cannot stop a 30-step fork before its end; lower the patience or the early-stop every$/],
    ['patience × every = the budget', { earlyStopPatience: 3, earlyStopEvery: 10 }, 30, /patience 3 with an evaluation every 10 steps cannot stop a 30-step fork/],
    ['patience × budget/10 >= the budget', { earlyStopPatience: 10 }, 200, /every 20 steps cannot stop a 200-step fork/],
  ];
  for (const [name, es, budget, re] of bad) {
    it(`rejects ${name}`, () => {
      const err = validateForkEarlyStop(es, budget);
      assert.ok(err && re.test(err), `${name}: got ${err}`);
    });
  }
  it('says the other options need a patience, like the supervisor', () => {
    assert.equal(EARLY_STOP_NEEDS_PATIENCE, 'early-stop metric/min delta/every need a patience N (N >= 1)');
  });
});

describe('fork early stopping: the dashboard form', () => {
  const es = (over: Partial<ForkEarlyStopForm> = {}): ForkEarlyStopForm => ({ patience: '0', metric: '', minDelta: '', every: '', ...over });

  it('an empty or 0 patience is off: nothing sent', () => {
    assert.deepEqual(forkEarlyStopFromForm(es(), 200), { earlyStop: {} });
    assert.deepEqual(forkEarlyStopFromForm(es({ patience: '' }), 200), { earlyStop: {} });
    assert.deepEqual(forkEarlyStopFromForm(es({ patience: ' 0 ' }), 200), { earlyStop: {} });
    // A 0 min delta / every left over means "the default": still off, nothing sent.
    assert.deepEqual(forkEarlyStopFromForm(es({ minDelta: '0', every: '0' }), 200), { earlyStop: {} });
  });

  it('a patience alone leaves the rest to the supervisor (slice, 0, budget / 10)', () => {
    assert.deepEqual(forkEarlyStopFromForm(es({ patience: '3' }), 200), { earlyStop: { earlyStopPatience: 3 } });
  });

  it('sends every field the form shows', () => {
    assert.deepEqual(forkEarlyStopFromForm(es({ patience: '2', metric: 'val', minDelta: '0.001', every: '5' }), 30), {
      earlyStop: { earlyStopPatience: 2, earlyStopMetric: 'val', earlyStopMinDelta: 0.001, earlyStopEvery: 5 },
    });
    assert.deepEqual(forkEarlyStopFromForm(es({ patience: '4', metric: 'slice', minDelta: '0', every: '' }), 300), {
      earlyStop: { earlyStopPatience: 4, earlyStopMetric: 'slice', earlyStopMinDelta: 0 },
    });
  });

  const bad: [string, Partial<ForkEarlyStopForm>, number, RegExp][] = [
    ['a fractional patience', { patience: '1.5' }, 200, /^early-stop patience "1\.5": must be an integer in 0\.\.1000000 \(0 = off\)$/],
    ['a negative patience', { patience: '-2' }, 200, /early-stop patience -2: must be an integer in 0\.\.1000000/],
    ['a text patience', { patience: 'x' }, 200, /early-stop patience "x"/],
    ['options without a patience', { patience: '0', metric: 'val' }, 200, /^early-stop metric\/min delta\/every need a patience N \(N >= 1\)$/],
    ['every without a patience', { patience: '', every: '10' }, 200, /need a patience/],
    ['an unknown metric', { patience: '3', metric: 'acc' }, 200, /early-stop metric "acc": one of slice, val/],
    ['a negative min delta', { patience: '3', minDelta: '-1' }, 200, /early-stop min delta -1: must be a finite number >= 0/],
    ['a text min delta', { patience: '3', minDelta: 'abc' }, 200, /early-stop min delta "abc"/],
    ['a fractional every', { patience: '3', every: '2.5' }, 200, /early-stop every "2\.5": must be an integer number of steps >= 1/],
    ['a negative every', { patience: '3', every: '-1' }, 200, /early-stop every -1/],
    ['a patience that cannot stop before the budget', { patience: '6', every: '5' }, 30, /patience 6 with an evaluation every 5 steps cannot stop a 30-step fork before its end/],
    ['every past the budget', { patience: '1', every: '31' }, 30, /every 31 steps cannot stop a 30-step fork/],
    ['patience 10 with the default cadence', { patience: '10' }, 200, /every 20 steps cannot stop a 200-step fork/],
  ];
  for (const [name, over, budget, re] of bad) {
    it(`rejects ${name}`, () => {
      const r = forkEarlyStopFromForm(es(over), budget);
      assert.ok('error' in r && re.test(r.error), `${name}: got ${JSON.stringify(r)}`);
    });
  }
});
