'use strict';
// Tensors over 1 MiB arrive chunked in Backward and Train; the client must join them exactly.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { GraphBuilder, tensors } = require('..');
const { connect, assertClose } = require('./support');

const SIZE = 300000; // float64: 2,400,000 bytes, so three chunks of at most 1 MiB
const CHUNKS = Math.ceil((SIZE * 8) / tensors.CHUNK_BYTES);

function bigGraph() {
  // w[i] covers many exponents and signs; 2 * w and 0.25 * (2 * w) are exact in float64
  const w = Float64Array.from({ length: SIZE }, (_, i) => ((i % 2001) - 1000) * 0.001 * (1 + (i % 7)));
  const g = new GraphBuilder('big parameter');
  g.parameter('w', w);
  g.op('square', 'sq', ['w']);
  g.op('sum', 'loss', ['sq']);
  return { graph: g.build(), w };
}

describe('chunked tensors', () => {
  let client;
  before(async () => {
    client = await connect();
  });
  after(() => client && client.close());

  it(`reassembles a ${SIZE}-element float64 gradient streamed by Backward in ${CHUNKS} chunks`, async () => {
    assert.equal(CHUNKS, 3);
    const { graph, w } = bigGraph();
    const info = await client.createGraph(graph);
    const received = [];
    const result = await client.backward(info.graph_id, {
      loss: 'loss',
      wrt: ['sq', 'w'],
      onGradient: (name) => received.push(name),
    });
    assert.equal(result.messages, 2 * CHUNKS, 'each of the two 2.4 MB gradients arrives in 3 messages');
    assert.deepEqual(received, ['sq', 'w']);
    const gradient = result.gradients.w;
    assert.equal(gradient.dtype, 'float64');
    assert.deepEqual(gradient.shape, [SIZE]);
    assert.equal(gradient.data.length, SIZE);
    for (let i = 0; i < SIZE; i += 1) {
      if (gradient.data[i] !== 2 * w[i]) assert.fail(`dloss/dw[${i}] = ${gradient.data[i]}, expected ${2 * w[i]}`);
    }
    assert.ok(result.gradients.sq.data.every((v) => v === 1), 'dloss/dsq is all ones');
    const sumOfSquares = w.reduce((sum, v) => sum + v * v, 0);
    assertClose(tensors.item(result.loss), sumOfSquares, { rtol: 1e-12, what: 'loss' });
    await client.deleteGraph(info.graph_id);
  });

  it('reassembles a non-scalar loss over 1 MiB sent ahead of the gradients', async () => {
    const { graph, w } = bigGraph();
    const info = await client.createGraph(graph);
    const seed = new Float64Array(SIZE).fill(0.5);
    const result = await client.backward(info.graph_id, { loss: 'sq', wrt: ['w'], lossGrad: seed });
    assert.equal(result.messages, 2 * CHUNKS - 1, 'two loss-only messages, then three gradient chunks');
    assert.deepEqual(result.loss.shape, [SIZE]);
    for (let i = 0; i < SIZE; i += 1) {
      if (result.loss.data[i] !== w[i] * w[i]) assert.fail(`sq[${i}] = ${result.loss.data[i]}`);
      if (result.gradients.w.data[i] !== w[i]) assert.fail(`dsq/dw[${i}] = ${result.gradients.w.data[i]}`);
    }
    await client.deleteGraph(info.graph_id);
  });

  it('reassembles chunked gradients and updates split over several Train messages (more_in_step)', async () => {
    const { graph, w } = bigGraph();
    const info = await client.createGraph(graph);
    const steps = await client.train(
      {
        graph_id: info.graph_id,
        loss: 'loss',
        optimizer: { sgd: { learning_rate: 0.25 } },
        stream_gradients: true,
        stream_updates: true,
      },
      [{}, {}], // the graph has no inputs: two empty batches
    );
    assert.deepEqual(steps.map((s) => s.step), [1, 2]);
    let current = Float64Array.from(w);
    for (const step of steps) {
      assert.ok(step.messages >= 2 * CHUNKS, `step ${step.step} came in ${step.messages} message(s)`);
      const gradient = step.gradients.w.data;
      const update = step.updates.w.data;
      assert.equal(gradient.length, SIZE);
      assert.equal(update.length, SIZE);
      for (let i = 0; i < SIZE; i += 1) {
        if (gradient[i] !== 2 * current[i]) assert.fail(`step ${step.step}: gradient[${i}] = ${gradient[i]}`);
        if (update[i] !== -0.25 * gradient[i]) assert.fail(`step ${step.step}: update[${i}] = ${update[i]}`);
      }
      current = current.map((v, i) => v + update[i]);
    }
    const { parameters, step } = await client.getParameters(info.graph_id);
    assert.equal(step, 2);
    assert.deepEqual(parameters.w.data, current);
    await client.deleteGraph(info.graph_id);
  });
});
