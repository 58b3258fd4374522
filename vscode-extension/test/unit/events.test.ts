import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { affectsDistribution, affectsRuns, errorLocation, errorPayload, evalMetricPoint, eventRunId, logPayload, metricPoints, samplesPayload } from '../../shared/events';
import type { EventDto } from '../../shared/protocol';

const ev = (kind: string, payload: Record<string, unknown>, runId = 'main'): EventDto => ({ seq: 1, time: 1, kind, runId, payload });

describe('event payloads', () => {
  it('reads metrics points in the proto documented row shape', () => {
    const pts = metricPoints(ev('metrics', { run_id: 'main', points: [{ step: 1, epoch: 0, loss: 0.7, lr: 0.001, grad_norm: null, extra: { acc: 0.5 } }, { epoch: 0 }] }));
    assert.equal(pts.length, 1);
    assert.deepEqual(pts[0], { step: 1, epoch: 0, values: { loss: 0.7, lr: 0.001, acc: 0.5 } });
  });

  it('reads metrics in the columnar shape the supervisor publishes', () => {
    const pts = metricPoints(ev('metrics', { step: [1, 2], epoch: [0, 0], time: [5, 6], loss: [0.7, 0.6], grad_norm: [null, 1.5], lr: [0.1, 0.1], short: [1] }));
    assert.deepEqual(pts, [
      { step: 1, epoch: 0, values: { loss: 0.7, lr: 0.1 } },
      { step: 2, epoch: 0, values: { loss: 0.6, grad_norm: 1.5, lr: 0.1 } },
    ]);
  });

  it('ignores malformed metrics', () => {
    assert.deepEqual(metricPoints(ev('metrics', {})), []);
    assert.deepEqual(metricPoints(ev('metrics', { points: 'x' })), []);
  });

  it('turns val/test evals into chart points', () => {
    assert.deepEqual(evalMetricPoint(ev('eval', { split: 'val', step: 24, epoch: 0, loss: 0.69, accuracy: 0.54 })), {
      step: 24,
      epoch: 0,
      values: { val_loss: 0.69, val_accuracy: 0.54, accuracy: 0.54 },
    });
    assert.deepEqual(evalMetricPoint(ev('eval', { split: 'test', step: 72, loss: 0.6, accuracy: null }))?.values, { test_loss: 0.6 });
    assert.equal(evalMetricPoint(ev('eval', { split: 'slice:hard', step: 1, loss: 1 })), null);
  });

  it('reads errors with their location', () => {
    const e = errorPayload(ev('error', { worker_id: 'main-0', message: 'ValueError: boom', traceback: 'Traceback...', filename: 'train.py', lineno: 42 }));
    assert.equal(e.message, 'ValueError: boom');
    assert.equal(errorLocation(e), 'train.py:42');
    assert.equal(errorLocation({ ...e, lineno: 0 }), 'train.py');
    assert.equal(errorLocation({ ...e, filename: '' }), '');
    assert.equal(errorPayload(ev('error', {})).message, '(no message)');
  });

  it('reads logs and samples with defaults', () => {
    assert.deepEqual(logPayload(ev('log', { text: 'hi' })), { workerId: '', level: 'info', text: 'hi' });
    const s = samplesPayload(ev('samples', { epoch: 2, seen: 100, p50: 0.5, p90: null }));
    assert.equal(s.epoch, 2);
    assert.equal(s.p50, 0.5);
    assert.equal(s.p90, null);
  });

  it('finds the run of an event and what it affects', () => {
    assert.equal(eventRunId(ev('log', { run_id: 'x' }, '')), 'x');
    assert.equal(eventRunId(ev('log', { run_id: 'x' }, 'main')), 'main');
    assert.ok(affectsRuns('run_status') && affectsRuns('finished') && !affectsRuns('log'));
    assert.ok(affectsDistribution('samples') && affectsDistribution('epoch_end') && !affectsDistribution('metrics'));
  });
});
