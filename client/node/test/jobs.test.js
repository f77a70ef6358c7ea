'use strict';
// Jobs from Node: createJob on an uploaded dataset, watchJob from the start and from a later step,
// getJob, listJobs, cancelJob, and the refusals CreateJob gives up front.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { GraphBuilder, tensors } = require('..');
const { connect } = require('./support');

const EXAMPLES = 48;

/** Logistic regression on 2 features, with an accuracy to evaluate. */
function logistic() {
  const g = new GraphBuilder('node job');
  g.input('x', { dtype: 'float64', shape: [-1, 2] });
  g.input('y', { dtype: 'float64', shape: [-1, 1] });
  g.parameter('w', [[0.1], [-0.2]]);
  g.parameter('b', [0]);
  g.op('matmul', 'xw', ['x', 'w']);
  g.op('add', 'logits', ['xw', 'b']);
  g.op('sigmoid_cross_entropy', 'loss', ['logits', 'y']);
  g.constant('zero', 0);
  g.constant('half', 0.5);
  g.op('greater', 'predicted', ['logits', 'zero']);
  g.op('greater', 'actual', ['y', 'half']);
  g.op('equal', 'right', ['predicted', 'actual']);
  g.op('cast', 'right_float', ['right'], { dtype: 'float64' });
  g.op('mean', 'accuracy', ['right_float']);
  return g.build();
}

function columns() {
  const x = new Float64Array(EXAMPLES * 2);
  const y = new Float64Array(EXAMPLES);
  for (let i = 0; i < EXAMPLES; i += 1) {
    x[2 * i] = Math.sin(i);
    x[2 * i + 1] = Math.cos(3 * i);
    y[i] = x[2 * i] - x[2 * i + 1] > 0 ? 1 : 0;
  }
  return { x: tensors.encode(x, [EXAMPLES, 2], 'float64'), y: tensors.encode(y, [EXAMPLES, 1], 'float64') };
}

describe('jobs', () => {
  let client;
  let graph;
  let dataset;
  before(async () => {
    client = await connect();
    graph = await client.createGraph(logistic());
    dataset = await client.uploadDataset('node job data', columns());
  });
  after(() => client && client.close());

  const spec = (extra = {}) => ({
    graph_id: graph.graph_id,
    loss: 'loss',
    optimizer: { sgd: { learning_rate: 0.5 } },
    dataset_id: dataset.dataset_id,
    feeds: { x: 'x', y: 'y' },
    batch_size: 8,
    ...extra,
  });

  it('runs a job to its end, watched from the start and from a later step', async () => {
    const created = await client.createJob(
      spec({ epochs: 3, shuffle: true, seed: 7, evaluation: { metrics: ['accuracy'], every_steps: 6 } }),
    );
    assert.equal(created.total_steps, 18);
    const seen = [];
    const events = await client.watchJob(created.job_id, { onEvent: (event) => seen.push(event) });
    assert.deepEqual(seen, events);
    assert.ok(['queued', 'running'].includes(events[0].state), JSON.stringify(events[0]));
    const steps = events.filter((event) => event.state === null);
    assert.deepEqual(
      steps.map((event) => event.step),
      Array.from({ length: 18 }, (_, i) => i + 1),
    );
    assert.deepEqual(
      steps.map((event) => event.epoch),
      Array.from({ length: 18 }, (_, i) => Math.floor(i / 6) + 1),
    );
    assert.deepEqual(
      steps.filter((event) => Object.keys(event.metrics).length).map((event) => event.step),
      [6, 12, 18],
    );
    assert.equal(events.at(-1).state, 'succeeded');
    const job = await client.getJob(created.job_id);
    assert.equal(job.state, 'succeeded');
    assert.equal(job.step, 18);
    assert.equal(job.metrics.accuracy, steps.at(-1).metrics.accuracy);
    const later = await client.watchJob(created.job_id, { fromStep: 16 });
    assert.deepEqual(later, [...steps.slice(15), { state: 'succeeded' }]);
    const { jobs } = await client.listJobs({ graphId: graph.graph_id, states: ['succeeded'] });
    assert.ok(jobs.some((listed) => listed.job_id === created.job_id));
  });

  it('cancels a running job, and stops watching when asked', async () => {
    const created = await client.createJob(spec({ max_steps: 1000000000 }));
    const controller = new AbortController();
    const watched = await client.watchJob(created.job_id, {
      signal: controller.signal,
      onEvent: (event) => event.step >= 3 && controller.abort(),
    });
    assert.ok(watched.filter((event) => event.state === null).length >= 3);
    const cancelled = await client.cancelJob(created.job_id);
    assert.equal(cancelled.job_id, created.job_id);
    const rest = await client.watchJob(created.job_id, { fromStep: 1 });
    assert.equal(rest.at(-1).state, 'cancelled');
    const job = await client.getJob(created.job_id);
    assert.equal(job.state, 'cancelled');
    assert.equal(rest.filter((event) => event.state === null).length, job.step);
  });

  it('is refused up front for an input the graph does not have', async () => {
    await assert.rejects(client.createJob(spec({ feeds: { x: 'x', y: 'y', z: 'x' }, epochs: 1 })), (error) => {
      assert.equal(error.codeName, 'INVALID_ARGUMENT');
      assert.equal(error.reason, 'UNKNOWN_FEED');
      return true;
    });
  });
});
