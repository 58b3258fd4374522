import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { buildRunCommand, connectionFileFor, describeCommand } from '../../src/command';
import { parseConnectionInfo } from '../../src/client';
import { comparisonFromProto, eventFromProto, metricsFromProto, parsePythonJson, roleName, runFromProto, runStatusName, statusFromProto, workerStateName } from '../../src/convert';

describe('proto -> DTO conversion', () => {
  it('names enums', () => {
    assert.equal(runStatusName('RUN_STATUS_PAUSED'), 'paused');
    assert.equal(runStatusName(4), 'completed');
    assert.equal(runStatusName('SOMETHING'), 'unspecified');
    assert.equal(workerStateName('WORKER_STATE_RUNNING'), 'running');
    assert.equal(roleName('ROLE_FORK'), 'fork');
  });

  it('maps NaN to null in runs and metric series', () => {
    const r = runFromProto({
      run_id: 'main', name: '', kind: 'main', status: 'RUN_STATUS_RUNNING', parents: [], step: 5, epoch: 0, last_loss: 0.5, val_loss: NaN, test_loss: NaN,
      sample_steps: 640, created: 1, ended: 0, config_json: '{}', last_checkpoint: '', error: '',
    });
    assert.equal(r.name, 'main', 'falls back to the id');
    assert.equal(r.valLoss, null);
    assert.equal(r.lastLoss, 0.5);
    const m = metricsFromProto({ run_id: 'main', key: 'grad_norm', steps: [1, 2, 3], values: [1, NaN, 3], total_points: 3 });
    assert.deepEqual(m.values, [1, null, 3]);
  });

  it('parses Python JSON with NaN / Infinity', () => {
    assert.deepEqual(parsePythonJson('{"a": NaN, "b": [Infinity, -Infinity, 1], "c": "NaN stays text"}'), { a: null, b: [null, null, 1], c: 'NaN stays text' });
    assert.equal(parsePythonJson('not json'), null);
    const e = eventFromProto({ seq: 3, time: 1, kind: 'metrics', run_id: 'main', payload_json: '{"step":[1],"loss":[NaN]}' });
    assert.deepEqual(e.payload, { step: [1], loss: [null] });
  });

  it('maps the GPUs of a session status (none on a CPU run)', () => {
    const base = { session_id: 's', session_dir: '/d', script: 't.py', argv: [], started: 1, automode: false, workers: [], runs: [], last_event_seq: 3, state: 'running', port: 1 };
    assert.deepEqual(statusFromProto(base).gpus, []);
    const s = statusFromProto({ ...base, gpus: [{ index: 1, name: 'H100', utilization: 87.5, memory_used_mb: 1024, memory_total_mb: NaN, worker_ids: ['w0'] }] });
    assert.deepEqual(s.gpus, [{ index: 1, name: 'H100', utilization: 87.5, memoryUsedMb: 1024, memoryTotalMb: 0 }]);
  });

  it('reshapes the row-major comparison', () => {
    const c = comparisonFromProto({ runs: ['a', 'b'], slices: ['all', 'q'], losses: [1, 2, 3, NaN] });
    assert.deepEqual(c.losses, [[1, 2], [3, null]]);
  });
});

describe('connection.json', () => {
  it('parses the supervisor file', () => {
    const info = parseConnectionInfo('{"host":"127.0.0.1","port":47621,"token":"t","session_id":"s","pid":12,"session_dir":"/x"}');
    assert.deepEqual(info, { host: '127.0.0.1', port: 47621, token: 't', session_id: 's', pid: 12, session_dir: '/x' });
  });
  it('names the bad field', () => {
    assert.throws(() => parseConnectionInfo('{"port":"nope","token":"t"}'), /"port"/);
    assert.throws(() => parseConnectionInfo('{"port":1}'), /"token"/);
    assert.throws(() => parseConnectionInfo('{'), /not JSON/);
  });
});

describe('the onthefly run command line', () => {
  it('builds python -m onthefly_supervisor run [--automode] SCRIPT ARGS', () => {
    const c = buildRunCommand(['/venv/bin/python'], { program: 'train.py', args: ['--epochs', '3'], automode: true }, '/ws');
    assert.equal(c.executable, '/venv/bin/python');
    assert.deepEqual(c.args, ['-m', 'onthefly_supervisor', 'run', '--automode', '/ws/train.py', '--epochs', '3']);
    assert.equal(c.cwd, '/ws');
  });
  it('keeps a multi-word interpreter (conda run ...) as a prefix', () => {
    const c = buildRunCommand(['conda', 'run', '-n', 'x', 'python'], { program: '/a/t.py' }, '/ws');
    assert.equal(c.executable, 'conda');
    assert.deepEqual(c.args.slice(0, 7), ['run', '-n', 'x', 'python', '-m', 'onthefly_supervisor', 'run']);
  });
  it('quotes for display and finds the connection file', () => {
    assert.equal(describeCommand({ executable: 'python3', args: ['-m', 'x', "it's here.py"], cwd: '/', program: '' }), `python3 -m x 'it'\\''s here.py'`);
    assert.equal(connectionFileFor('/ws'), '/ws/.onthefly/sessions/latest/connection.json');
  });
  it('refuses a config without a program', () => {
    assert.throws(() => buildRunCommand(['python3'], { program: '' }, '/ws'), /program/);
  });
});
