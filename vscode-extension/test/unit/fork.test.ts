/**
 * shared/fork.ts: the race fields of a fork (variants, lr multipliers, eta, metric, mode),
 * checked the CLI's way, and parsed from the dashboard's fork form.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { type ForkRaceForm, RACE_NEEDS_VARIANTS, forkRaceFromForm, parseLrMuls, validateForkRace } from '../../shared/fork';

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
