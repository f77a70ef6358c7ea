'use strict';
// Answers over gRPC's default 4 MiB: a 1500x1500 float64 weight (18 MB), graph views and
// CreateGraph's requestId.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { Client, GraphBuilder, tensors } = require('..');
const { connect, serverAddress } = require('./support');

const SIDE = 1500;
const FOUR_MIB = 4;

function denseModel() {
  // every element different, so a chunk out of place shows
  const w = Float64Array.from({ length: SIDE * SIDE }, (_, i) => i / 7);
  const g = new GraphBuilder('dense');
  g.input('x', { dtype: 'float64', shape: [-1, SIDE] });
  g.parameter('w', tensors.encode(w, [SIDE, SIDE]));
  g.op('matmul', 'y', ['x', 'w']);
  g.op('sum', 'loss', ['y']);
  return { graph: g.build(), w };
}

function lecture() {
  const g = new GraphBuilder('lecture');
  for (const name of ['x', 'y', 'z']) g.input(name);
  g.op('add', 'q', ['x', 'y']);
  g.op('mul', 'f', ['q', 'z']);
  return g.build();
}

async function countGraphs(client) {
  return (await client.listGraphs({ pageSize: 1000 })).graphs.length;
}

describe('answers larger than a default client receives', () => {
  let client;
  let dense;
  let denseId;
  before(async () => {
    client = await connect();
    dense = denseModel();
    denseId = (await client.createGraph(dense.graph)).graph_id;
  });
  after(async () => {
    if (client) {
      if (denseId) await client.deleteGraph(denseId).catch(() => {});
      client.close();
    }
  });

  it('getParameters reassembles a 1500x1500 float64 weight, even with a 4 MiB receive limit', async () => {
    const limited = new Client(serverAddress(), { maxMessageMb: FOUR_MIB, deadlineMs: 60000 });
    try {
      for (const reader of [client, limited]) {
        const { parameters, step } = await reader.getParameters(denseId);
        assert.equal(step, 0);
        assert.deepEqual(Object.keys(parameters), ['w']);
        assert.deepEqual(parameters.w.shape, [SIDE, SIDE]);
        assert.equal(parameters.w.dtype, 'float64');
        assert.deepEqual(parameters.w.data, dense.w);
      }
      await assert.rejects(limited.forward(denseId, {}, ['w']), (error) => error.code === 8); // RESOURCE_EXHAUSTED
    } finally {
      limited.close();
    }
  });

  it('receives an 18 MB definition and Forward answer by default', async () => {
    const { definition } = await client.getGraph(denseId, { includeDefinition: true });
    const weight = definition.nodes.find((node) => node.name === 'w');
    assert.deepEqual(tensors.decode(weight.value).data, dense.w);
    const { w } = await client.forward(denseId, {}, ['w']);
    assert.deepEqual(w.data, dense.w);
    const light = await client.getGraph(denseId, { includeDefinition: true, omitParameterValues: true });
    assert.equal(light.definition.nodes.find((node) => node.name === 'w').value, null);
  });

  it('lists and creates in the basic view unless asked for the full one', async () => {
    const created = await client.createGraph(lecture());
    assert.deepEqual(created.topological_order, []);
    assert.equal(created.node_count, 5);
    const full = await client.getGraph(created.graph_id);
    assert.equal(full.graph.topological_order.length, 5);
    const basic = await client.getGraph(created.graph_id, { view: 'basic' });
    assert.deepEqual(basic.graph.topological_order, []);
    const listed = (await client.listGraphs({ pageSize: 1000 })).graphs.find((g) => g.graph_id === created.graph_id);
    assert.deepEqual(listed.topological_order, []);
    const listedFull = await client.listGraphs({ pageSize: 1000, view: 'full' });
    assert.equal(listedFull.graphs.find((g) => g.graph_id === created.graph_id).topological_order.length, 5);
    await assert.rejects(client.listGraphs({ view: 'everything' }), /view must be 'basic' or 'full'/);
    await client.deleteGraph(created.graph_id);
  });

  it('a createGraph retried with the same requestId resolves to the first graph', async () => {
    const before = await countGraphs(client);
    const requestId = `node-${Date.now()}`;
    const first = await client.createGraph(lecture(), { requestId });
    const again = await client.createGraph(lecture(), { requestId });
    assert.equal(again.graph_id, first.graph_id);
    assert.equal(await countGraphs(client), before + 1);
    const renamed = { ...lecture(), name: 'another graph' };
    await assert.rejects(client.createGraph(renamed, { requestId }), (error) => {
      assert.equal(error.reason, 'REQUEST_ID_REUSED');
      return true;
    });
    await client.deleteGraph(first.graph_id);
  });
});
