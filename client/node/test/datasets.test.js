'use strict';
// Datasets from Node: uploadDataset streams columns in 1 MiB chunks; get, list, delete.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { ChainruleError, tensors } = require('..');
const { connect } = require('./support');

describe('datasets', () => {
  let client;
  before(async () => {
    client = await connect();
  });
  after(() => client && client.close());

  it('uploads float32, int64 and bool columns (one over 1 MiB) whose sha256 and size match their bytes', async () => {
    const examples = 50000;
    const x = new Float32Array(examples * 6).map((_, i) => i * 0.25); // 1.2 MB: two chunks
    const y = new BigInt64Array(examples).map((_, i) => BigInt(i % 10));
    const mask = Array.from({ length: examples }, (_, i) => i % 3 === 0);
    const columns = {
      x: tensors.encode(x, [examples, 2, 3], 'float32'),
      y: tensors.encode(y, [examples], 'int64'),
      mask: tensors.encode(mask, [examples], 'bool'),
    };
    const progress = [];
    const dataset = await client.uploadDataset('node-upload', columns, {
      onProgress: (sent, total) => progress.push([sent, total]),
    });
    const bytes = Buffer.concat([columns.x.data, columns.y.data, columns.mask.data]);
    assert.equal(dataset.name, 'node-upload');
    assert.equal(dataset.num_examples, examples);
    assert.equal(dataset.size_bytes, bytes.length);
    assert.equal(dataset.sha256, crypto.createHash('sha256').update(bytes).digest('hex'));
    assert.deepEqual(dataset.columns, [
      { name: 'x', dtype: 'float32', shape: [2, 3] },
      { name: 'y', dtype: 'int64', shape: [] },
      { name: 'mask', dtype: 'bool', shape: [] },
    ]);
    assert.deepEqual(progress.at(-1), [bytes.length, bytes.length]);
    assert.ok(progress.length >= 4, `${progress.length} chunks`);

    assert.deepEqual(await client.getDataset(dataset.dataset_id), dataset);
    const { datasets } = await client.listDatasets({ pageSize: 1000 });
    assert.ok(datasets.some((listed) => listed.dataset_id === dataset.dataset_id));
    await client.deleteDataset(dataset.dataset_id);
    await assert.rejects(client.getDataset(dataset.dataset_id), (error) => error.codeName === 'NOT_FOUND');
  });

  it('refuses columns of different lengths before calling, and the server refuses a bad name', async () => {
    await assert.rejects(client.uploadDataset('uneven', { x: [1, 2, 3], y: [1, 2] }), /same number of examples/);
    await assert.rejects(client.uploadDataset('bad\u0007name', { x: [1, 2, 3] }), (error) => {
      assert.ok(error instanceof ChainruleError);
      assert.equal(error.codeName, 'INVALID_ARGUMENT');
      assert.equal(error.reason, 'BAD_NAME');
      return true;
    });
  });
});
