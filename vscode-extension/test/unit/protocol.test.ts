import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  MessageType,
  ProtocolError,
  decodeHostMessage,
  decodeWebviewMessage,
  describeError,
  encodeMessage,
  finiteOrNull,
  makeRequest,
} from '../../shared/protocol';

describe('protocol: webview -> host', () => {
  it('round-trips a request through encode/decode', () => {
    const req = makeRequest(7, 'fork', { run: 'main', select: 'quantile:0.85:1.0', budgetSteps: 200, lrMul: 0.5, adaptersRank: 8 });
    const back = decodeWebviewMessage(encodeMessage(req));
    assert.deepEqual(back, req);
  });

  it('round-trips a race of fork variants', () => {
    const req = makeRequest(8, 'fork', {
      run: 'main', select: 'quantile:0.9:1.0', budgetSteps: 240, lrMul: 1, adaptersRank: 0,
      variants: 3, variantLrMuls: [0.3, 1, 3], raceEta: 3, raceMetric: 'val', raceMode: 'sync',
    });
    assert.deepEqual(decodeWebviewMessage(encodeMessage(req)), req);
  });

  it('round-trips a fork that stops early (with a race, too)', () => {
    const req = makeRequest(9, 'fork', {
      run: 'main', select: 'quantile:0.9:1.0', budgetSteps: 30, lrMul: 1, adaptersRank: 0,
      earlyStopPatience: 2, earlyStopMetric: 'val', earlyStopMinDelta: 0.001, earlyStopEvery: 5,
    });
    assert.deepEqual(decodeWebviewMessage(encodeMessage(req)), req);
    const race = makeRequest(10, 'fork', {
      run: 'main', select: 'all', budgetSteps: 300, lrMul: 1, adaptersRank: 0, variants: 4, earlyStopPatience: 3,
    });
    assert.deepEqual(decodeWebviewMessage(encodeMessage(race)), race);
  });

  it('accepts ready and notify', () => {
    assert.deepEqual(decodeWebviewMessage({ type: 'ready' }), { type: MessageType.Ready });
    assert.deepEqual(decodeWebviewMessage({ type: 'notify', level: 'error', text: 'x' }), { type: MessageType.Notify, level: 'error', text: 'x' });
  });

  it('defaults missing params to {} for parameterless methods', () => {
    const m = decodeWebviewMessage({ type: 'request', id: 1, method: 'listRuns' });
    assert.equal(m.type, MessageType.Request);
    assert.deepEqual((m as { params: unknown }).params, {});
  });

  const bad: [string, unknown, RegExp][] = [
    ['not an object', 42, /must be an object/],
    ['unknown type', { type: 'hello' }, /unknown message type/],
    ['unknown method', { type: 'request', id: 1, method: 'rmrf', params: {} }, /unknown method/],
    ['non-integer id', { type: 'request', id: 1.5, method: 'listRuns', params: {} }, /"id"/],
    ['missing run', { type: 'request', id: 1, method: 'pause', params: {} }, /"run" must be a string/],
    ['NaN budget', { type: 'request', id: 1, method: 'fork', params: { run: 'main', select: 'all', budgetSteps: NaN, lrMul: 1, adaptersRank: 0 } }, /budgetSteps/],
    ['race eta out of range', { type: 'request', id: 1, method: 'fork', params: { run: 'main', select: 'all', budgetSteps: 100, lrMul: 1, adaptersRank: 0, variants: 4, raceEta: 9 } }, /race eta must be an integer in 2\.\.8/],
    ['race options without a race', { type: 'request', id: 1, method: 'fork', params: { run: 'main', select: 'all', budgetSteps: 100, lrMul: 1, adaptersRank: 0, variants: 1, raceMetric: 'val' } }, /race options need 2 or more variants/],
    ['unknown race mode', { type: 'request', id: 1, method: 'fork', params: { run: 'main', select: 'all', budgetSteps: 100, lrMul: 1, adaptersRank: 0, variants: 2, raceMode: 'hyperband' } }, /race mode must be one of asha, sync/],
    ['race metric not a string', { type: 'request', id: 1, method: 'fork', params: { run: 'main', select: 'all', budgetSteps: 100, lrMul: 1, adaptersRank: 0, variants: 2, raceMetric: 1 } }, /"raceMetric" must be a string/],
    ['lr multipliers not numbers', { type: 'request', id: 1, method: 'fork', params: { run: 'main', select: 'all', budgetSteps: 100, lrMul: 1, adaptersRank: 0, variantLrMuls: ['0.5', 2] } }, /"variantLrMuls" must be an array of finite numbers/],
    ['a negative lr multiplier', { type: 'request', id: 1, method: 'fork', params: { run: 'main', select: 'all', budgetSteps: 100, lrMul: 1, adaptersRank: 0, variantLrMuls: [0.5, -2] } }, /positive/],
    ['negative early-stop patience', { type: 'request', id: 1, method: 'fork', params: { run: 'main', select: 'all', budgetSteps: 100, lrMul: 1, adaptersRank: 0, earlyStopPatience: -1 } }, /early-stop patience -1: must be an integer in 0\.\.1000000 \(0 = off\)/],
    ['unknown early-stop metric', { type: 'request', id: 1, method: 'fork', params: { run: 'main', select: 'all', budgetSteps: 100, lrMul: 1, adaptersRank: 0, earlyStopPatience: 3, earlyStopMetric: 'train' } }, /early-stop metric "train": one of slice, val/],
    ['early-stop options without a patience', { type: 'request', id: 1, method: 'fork', params: { run: 'main', select: 'all', budgetSteps: 100, lrMul: 1, adaptersRank: 0, earlyStopEvery: 10 } }, /early-stop metric\/min delta\/every need a patience N \(N >= 1\)/],
    ['early stopping that cannot stop before the budget', { type: 'request', id: 1, method: 'fork', params: { run: 'main', select: 'all', budgetSteps: 100, lrMul: 1, adaptersRank: 0, earlyStopPatience: 5, earlyStopEvery: 20 } }, /cannot stop a 100-step fork before its end/],
    ['a negative early-stop min delta', { type: 'request', id: 1, method: 'fork', params: { run: 'main', select: 'all', budgetSteps: 100, lrMul: 1, adaptersRank: 0, earlyStopPatience: 2, earlyStopMinDelta: -1 } }, /early-stop min delta -1: must be a finite number >= 0/],
    ['early-stop metric not a string', { type: 'request', id: 1, method: 'fork', params: { run: 'main', select: 'all', budgetSteps: 100, lrMul: 1, adaptersRank: 0, earlyStopPatience: 2, earlyStopMetric: 1 } }, /"earlyStopMetric" must be a string/],
    ['17 variants', { type: 'request', id: 1, method: 'fork', params: { run: 'main', select: 'all', budgetSteps: 100, lrMul: 1, adaptersRank: 0, variants: 17 } }, /1\.\.16/],
    ['bad merge method', { type: 'request', id: 1, method: 'merge', params: { method: 'average', runs: ['a'] } }, /method must be one of/],
    ['runs not strings', { type: 'request', id: 1, method: 'gate', params: { runs: ['a', 2] } }, /array of strings/],
    ['bad format', { type: 'request', id: 1, method: 'exportSlice', params: { run: 'main', select: 'all', format: 'xlsx' } }, /format must be one of/],
    ['edit values not strings', { type: 'request', id: 1, method: 'editPlan', params: { planId: 'p', values: { a: 1 } } }, /values/],
    ['automode not boolean', { type: 'request', id: 1, method: 'setAutomode', params: { enabled: 'yes' } }, /boolean/],
  ];
  for (const [name, msg, re] of bad) {
    it(`rejects ${name}`, () => {
      assert.throws(() => decodeWebviewMessage(msg), (e: unknown) => e instanceof ProtocolError && re.test((e as Error).message));
    });
  }
});

describe('protocol: host -> webview', () => {
  it('decodes each host message type and ignores foreign ones', () => {
    assert.equal(decodeHostMessage({ type: 'response', id: 1, ok: true, result: [] })?.type, MessageType.Response);
    assert.equal(decodeHostMessage({ type: 'response', id: 1, ok: false })?.type, undefined, 'an error response needs an error');
    assert.equal(decodeHostMessage({ type: 'connection', connection: { state: 'connected' } })?.type, MessageType.Connection);
    assert.equal(decodeHostMessage({ type: 'events', events: [], replay: false })?.type, MessageType.Events);
    assert.equal(decodeHostMessage({ type: 'sessionChanged', sessionId: 's' })?.type, MessageType.SessionChanged);
    assert.equal(decodeHostMessage({ type: 'vscode-internal' }), undefined);
    assert.equal(decodeHostMessage(null), undefined);
    assert.equal(decodeHostMessage('{"type":"sessionChanged","sessionId":"x"}')?.type, MessageType.SessionChanged);
  });

  it('refuses to encode non-finite numbers (JSON would turn them into null silently)', () => {
    assert.throws(() => encodeMessage({ type: MessageType.Events, replay: false, events: [{ seq: 1, time: NaN, kind: 'x', runId: '', payload: {} }] }), ProtocolError);
  });

  it('maps non-finite numbers to null', () => {
    assert.equal(finiteOrNull(NaN), null);
    assert.equal(finiteOrNull(Infinity), null);
    assert.equal(finiteOrNull(undefined), null);
    assert.equal(finiteOrNull(0), 0);
    assert.equal(finiteOrNull(-2.5), -2.5);
  });

  it('describes an RPC error for a toast', () => {
    assert.equal(describeError('fork', { code: 12, codeName: 'UNIMPLEMENTED', message: 'fork is not built yet' }), 'Fork failed: UNIMPLEMENTED: fork is not built yet');
    assert.equal(describeError('pause', { code: 9, codeName: 'FAILED_PRECONDITION', message: '' }), 'Pause failed: FAILED_PRECONDITION');
    assert.equal(describeError('runHealthCheck', { code: 12, codeName: 'UNIMPLEMENTED', message: 'x' }), 'Health check failed: UNIMPLEMENTED: x');
  });
});
