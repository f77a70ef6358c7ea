'use strict';
// Every wire dtype through the server and back with Forward.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { GraphBuilder, tensors } = require('..');
const { connect } = require('./support');

describe('Forward', () => {
  let client;
  before(async () => {
    client = await connect();
  });
  after(() => client && client.close());

  it('round-trips int32, int64, bool, float32 and float64 tensors in row-major order', async () => {
    const g = new GraphBuilder('dtypes');
    g.input('i', { dtype: 'int32' });
    g.input('l', { dtype: 'int64' });
    g.input('m', { dtype: 'float64', shape: [-1, 3] });
    g.constant('flag', [true, false, true]);
    g.constant('f32', tensors.encode(new Float32Array([1.5, 2.5, 3.5])));
    g.op('add', 'twice', ['i', 'i']);
    g.op('mul', 'squared', ['l', 'l']);
    g.op('sum', 'total', ['f32'], { axes: [0] });
    g.op('transpose', 't', ['m'], { perm: [1, 0] });
    const info = await client.createGraph(g.build());
    const out = await client.forward(
      info.graph_id,
      { i: new Int32Array([1, -2, 3]), l: new BigInt64Array([3n, -(2n ** 31n)]), m: [[1, 2, 3], [4, 5, 6]] },
      ['twice', 'squared', 'flag', 'f32', 'total', 't'],
    );
    assert.deepEqual(out.twice, { dtype: 'int32', shape: [3], data: new Int32Array([2, -4, 6]) });
    assert.deepEqual(out.squared, { dtype: 'int64', shape: [2], data: new BigInt64Array([9n, 2n ** 62n]) });
    assert.deepEqual(out.flag, { dtype: 'bool', shape: [3], data: [true, false, true] });
    assert.deepEqual(out.f32, { dtype: 'float32', shape: [3], data: new Float32Array([1.5, 2.5, 3.5]) });
    assert.deepEqual(out.total, { dtype: 'float32', shape: [], data: new Float32Array([7.5]) });
    assert.deepEqual(tensors.toNested(out.t), [[1, 4], [2, 5], [3, 6]]);
    const { definition } = await client.getGraph(info.graph_id, { includeDefinition: true });
    const transpose = definition.nodes.find((node) => node.name === 't');
    assert.deepEqual(transpose.attrs.perm.ints.values, ['1', '0']); // int64 arrives as strings (longs: String)
    await client.deleteGraph(info.graph_id);
  });
});
