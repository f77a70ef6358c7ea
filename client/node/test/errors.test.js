'use strict';
// Failed calls: status codes, messages and the google.rpc details the server attaches.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { ChainruleError, GraphBuilder, tensors } = require('..');
const { connect } = require('./support');

const MISSING = 'no-such-graph-0123456789';

function lecture() {
  const g = new GraphBuilder('lecture');
  for (const name of ['x', 'y', 'z']) g.input(name);
  g.op('add', 'q', ['x', 'y']);
  g.op('mul', 'f', ['q', 'z']);
  return g.build();
}

function assertNotFound(error) {
  assert.ok(error instanceof ChainruleError, `expected a ChainruleError, got ${error}`);
  assert.equal(error.code, 5);
  assert.equal(error.codeName, 'NOT_FOUND');
  assert.ok(error.details.includes(MISSING), `details "${error.details}" do not name the graph id`);
  assert.equal(error.reason, 'GRAPH_NOT_FOUND');
  assert.equal(error.domain, 'chainrule');
  assert.equal(error.metadata.subject, MISSING);
  return true;
}

describe('errors', () => {
  let client;
  before(async () => {
    client = await connect();
  });
  after(() => client && client.close());

  it('an unknown graph id is NOT_FOUND (code 5) with the id in the details, for unary calls', async () => {
    await assert.rejects(client.getGraph(MISSING), assertNotFound);
    await assert.rejects(client.forward(MISSING, { x: 1 }, ['f']), assertNotFound);
    await assert.rejects(client.deleteGraph(MISSING), assertNotFound);
  });

  it('and for the Backward and Train streams', async () => {
    await assert.rejects(client.backward(MISSING, { loss: 'f' }), assertNotFound);
    const config = { graph_id: MISSING, loss: 'f', optimizer: { sgd: { learning_rate: 0.1 } } };
    await assert.rejects(client.train(config, [{ x: 1 }]), assertNotFound);
  });

  it('a deleted graph is gone', async () => {
    const info = await client.createGraph(lecture());
    const { graphs } = await client.listGraphs({ pageSize: 1000 });
    assert.ok(graphs.some((graph) => graph.graph_id === info.graph_id));
    await client.deleteGraph(info.graph_id);
    await assert.rejects(client.getGraph(info.graph_id), (error) => error.code === 5 && error.details.includes(info.graph_id));
  });

  it('INVALID_ARGUMENT carries a BadRequest field violation naming the culprit', async () => {
    const g = new GraphBuilder('bad');
    g.input('x');
    g.op('frobnicate', 'y', ['x']);
    await assert.rejects(client.createGraph(g.build()), (error) => {
      assert.equal(error.code, 3);
      assert.equal(error.reason, 'UNKNOWN_OP');
      assert.deepEqual(error.violations, [{ field: 'y', description: error.details }]);
      assert.match(error.details, /frobnicate/);
      return true;
    });
  });

  it('a bad batch ends a Train stream with INVALID_ARGUMENT after the good steps', async () => {
    const g = new GraphBuilder('one weight');
    g.input('x', { dtype: 'float64', shape: [-1, 2] });
    g.parameter('w', tensors.encode([[0.5], [-0.5]]));
    g.op('matmul', 'out', ['x', 'w']);
    g.op('square', 'sq', ['out']);
    g.op('mean', 'loss', ['sq']);
    const info = await client.createGraph(g.build());
    const good = { x: [[1, 2], [3, 4]] };
    const bad = { x: [[1, 2, 3]] };
    const config = { graph_id: info.graph_id, loss: 'loss', optimizer: { sgd: { learning_rate: 0.01 } } };
    await assert.rejects(client.train(config, [good, good, bad, good]), (error) => {
      assert.equal(error.code, 3);
      assert.match(error.details, /batch 2/);
      assert.deepEqual(error.steps.map((s) => s.step), [1, 2], "the steps before the bad batch are reported");
      return true;
    });
    const { step } = await client.getParameters(info.graph_id);
    assert.equal(step, 2, 'the two good steps were applied and kept');
    await client.deleteGraph(info.graph_id);
  });

  it('tensors that do not match their shape are refused before they are sent', () => {
    assert.throws(() => tensors.encode(new Float64Array(5), [2, 3]), /5 elements do not fill shape \[2,3\]/);
  });
});

describe('a batch that cannot be encoded', () => {
  let client;
  before(async () => {
    client = await connect();
  });
  after(() => client && client.close());

  it('ends the Train stream after the batches before it were trained, then rejects', async () => {
    const g = new GraphBuilder('one weight');
    g.input('x', { dtype: 'float64', shape: [-1, 2] });
    g.parameter('w', tensors.encode([[0.5], [-0.5]]));
    g.op('matmul', 'out', ['x', 'w']);
    g.op('mean', 'loss', ['out']);
    const info = await client.createGraph(g.build());
    const good = { x: [[1, 2]] };
    const ragged = { x: [[1, 2], [3]] };
    const config = { graph_id: info.graph_id, loss: 'loss', optimizer: { sgd: { learning_rate: 0.01 } } };
    await assert.rejects(client.train(config, [good, good, good, ragged, good]), (error) => {
      assert.match(error.message, /x: value\[1\] is ragged/);
      assert.deepEqual(error.steps.map((s) => s.step), [1, 2, 3]);
      return true;
    });
    assert.equal((await client.getParameters(info.graph_id)).step, 3);
    await client.deleteGraph(info.graph_id);
  });
});
