'use strict';
// Jobs from Node: createJob on an uploaded dataset, watchJob from the start and from a later step,
// getJob, listJobs, cancelJob, and the refusals CreateJob gives up front; watches that outlast the
// unary deadline, survive a dropped connection, keep no events, or are read as async iterators.

const net = require('node:net');
const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { Client, GraphBuilder, tensors } = require('..');
const { connect, serverAddress } = require('./support');

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

/**
 * A TCP relay on 127.0.0.1 in front of the server whose open connections `drop()` cuts, as a
 * network fault or a restarting server would; it accepts new connections after.
 */
async function relay(target) {
  const [host, port] = [target.slice(0, target.lastIndexOf(':')), Number(target.slice(target.lastIndexOf(':') + 1))];
  const open = new Set();
  let connections = 0;
  const server = net.createServer((incoming) => {
    connections += 1;
    const outgoing = net.connect(port, host);
    for (const [from, to] of [[incoming, outgoing], [outgoing, incoming]]) {
      open.add(from);
      from.pipe(to);
      from.on('error', () => to.destroy());
      from.on('close', () => {
        open.delete(from);
        to.destroy();
      });
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    address: `127.0.0.1:${server.address().port}`,
    connections: () => connections,
    drop: () => {
      for (const socket of open) socket.destroy();
    },
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}

const steps = (events) => events.filter((event) => event.state === null).map((event) => event.step);
const upTo = (count) => Array.from({ length: count }, (_, i) => i + 1);

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

  it('watches a job for longer than the per-call deadline', async () => {
    const hurried = new Client(serverAddress(), { deadlineMs: 300 });
    const created = await hurried.createJob(spec({ max_steps: 1000000000 }));
    try {
      let first = null;
      let cancelling = null;
      const events = await hurried.watchJob(created.job_id, {
        onEvent: (event) => {
          first = first ?? Date.now();
          // Well past the 300 ms deadline of unary calls, the job is cancelled: the watch ends then, with it.
          if (cancelling === null && Date.now() - first > 1500) cancelling = hurried.cancelJob(created.job_id);
        },
      });
      await cancelling;
      assert.equal(events.at(-1).state, 'cancelled');
      assert.deepEqual(steps(events), upTo((await hurried.getJob(created.job_id)).step));
    } finally {
      await hurried.cancelJob(created.job_id); // a job left running would hold the next tests' jobs in the queue
      hurried.close();
    }
  });

  it('resumes after a dropped connection from the step after the last it saw', async () => {
    const proxy = await relay(serverAddress());
    const watcher = new Client(proxy.address, { deadlineMs: 60000 });
    try {
      const created = await client.createJob(spec({ max_steps: 3000, shuffle: false }));
      let dropped = false;
      const events = await watcher.watchJob(created.job_id, {
        retryDelayMs: 50,
        onEvent: (event) => {
          if (!dropped && event.step >= 100) {
            dropped = true;
            proxy.drop();
          }
        },
      });
      assert.ok(proxy.connections() >= 2, 'the watch connected again');
      assert.deepEqual(steps(events), upTo(3000));
      const states = events.filter((event) => event.state !== null).map((event) => event.state);
      assert.equal(states.at(-1), 'succeeded');
      assert.ok(states.every((state, i) => i === 0 || state !== states[i - 1]), `states repeat: ${states}`);
    } finally {
      watcher.close();
      await proxy.close();
    }
  });

  it('follows a job without keeping its events, or as an async iterator read at its own pace', async () => {
    const created = await client.createJob(spec({ epochs: 4, evaluation: { metrics: ['accuracy'], every_steps: 4 } }));
    const seen = [];
    const last = await client.watchJob(created.job_id, { collect: false, onEvent: (event) => seen.push(event) });
    assert.deepEqual(last, { state: 'succeeded' });
    assert.deepEqual(steps(seen), upTo(24));
    const iterated = [];
    for await (const event of client.jobEvents(created.job_id, { fromStep: 3 })) {
      iterated.push(event);
      await new Promise((resolve) => setTimeout(resolve, 2)); // a slow reader misses nothing
    }
    assert.deepEqual(steps(iterated), upTo(24).slice(2));
    assert.deepEqual(iterated.at(-1), { state: 'succeeded' });
    const early = [];
    for await (const event of client.jobEvents(created.job_id)) {
      early.push(event);
      if (early.length === 5) break; // leaving the loop ends the watch
    }
    assert.equal(early.length, 5);
  });
});

