'use strict';
// The tensor codec on its own (no server): byte layout, dtypes, chunk reassembly.

const test = require('node:test');
const assert = require('node:assert/strict');
const { tensors } = require('..');

test('a 2x3 float32 matrix is six little-endian floats in row-major order', () => {
  const message = tensors.encode(new Float32Array([1, 2, 3, 4, 5, 6]), [2, 3]);
  assert.equal(message.dtype, 'DATA_TYPE_FLOAT32');
  assert.deepEqual(message.shape, [2, 3]);
  const expected = Buffer.alloc(24);
  [1, 2, 3, 4, 5, 6].forEach((value, i) => expected.writeFloatLE(value, 4 * i));
  assert.deepEqual(message.data, expected);
  assert.equal(message.data.toString('hex').slice(0, 16), '0000803f00000040'); // 1.0f, 2.0f
  const decoded = tensors.decode(message);
  assert.deepEqual(tensors.toNested(decoded), [[1, 2, 3], [4, 5, 6]]);
});

test('nested arrays become float64 with their shape; scalars have shape []', () => {
  const matrix = tensors.encode([[1.5, -2], [3, 4], [5, 6]]);
  assert.equal(matrix.dtype, 'DATA_TYPE_FLOAT64');
  assert.deepEqual(matrix.shape, [3, 2]);
  assert.equal(matrix.data.readDoubleLE(8), -2);
  const scalar = tensors.encode(-4);
  assert.deepEqual(scalar.shape, []);
  assert.equal(scalar.data.length, 8);
  assert.equal(tensors.item(tensors.decode(scalar)), -4);
  assert.throws(() => tensors.encode([[1, 2], [3]]), /ragged/);
});

test('int32, int64 and bool round-trip with their item sizes', () => {
  const ints = tensors.encode(new Int32Array([-1, 2, 3]));
  assert.equal(ints.data.toString('hex'), 'ffffffff0200000003000000');
  assert.deepEqual(Array.from(tensors.decode(ints).data), [-1, 2, 3]);
  const longs = tensors.encode(new BigInt64Array([-(2n ** 62n), 7n]));
  assert.equal(longs.dtype, 'DATA_TYPE_INT64');
  assert.equal(longs.data.readBigInt64LE(0), -(2n ** 62n));
  assert.deepEqual(Array.from(tensors.decode(longs).data), [-(2n ** 62n), 7n]);
  const bools = tensors.encode([true, false, true]);
  assert.equal(bools.dtype, 'DATA_TYPE_BOOL');
  assert.equal(bools.data.toString('hex'), '010001');
  assert.deepEqual(tensors.decode(bools).data, [true, false, true]);
  assert.throws(() => tensors.decode({ dtype: 'DATA_TYPE_BOOL', shape: ['1'], data: Buffer.from([2]) }), /not 0 or 1/);
  assert.deepEqual(tensors.encode([1, 2], [2], 'int32').data, Buffer.from('0100000002000000', 'hex'));
});

test('decode checks the byte count and accepts unaligned buffers and string shapes', () => {
  assert.throws(
    () => tensors.decode({ dtype: 'DATA_TYPE_FLOAT64', shape: ['2'], data: Buffer.alloc(8) }, 'w'),
    /tensor 'w' has 8 bytes of data; shape \[2\] of float64 needs 16/,
  );
  const backing = Buffer.alloc(17);
  backing.writeDoubleLE(3.25, 1);
  backing.writeDoubleLE(-0.5, 9);
  const unaligned = backing.subarray(1);
  const tensor = tensors.decode({ dtype: 'DATA_TYPE_FLOAT64', shape: ['2'], data: unaligned });
  assert.deepEqual(Array.from(tensor.data), [3.25, -0.5]);
  assert.throws(() => tensors.decode({ dtype: 'DATA_TYPE_UNSPECIFIED', shape: [], data: Buffer.alloc(0) }), /unsupported dtype/);
});

test('the Assembler joins chunks in order and refuses gaps', () => {
  const whole = tensors.encode(Float64Array.from({ length: 10 }, (_, i) => i / 3), [2, 5]);
  const pieces = [0, 32, 64].map((offset) => ({
    dtype: whole.dtype,
    shape: whole.shape.map(String),
    data: whole.data.subarray(offset, offset + 32),
    chunk_offset: String(offset),
    more_chunks: offset + 32 < whole.data.length,
  }));
  const assembler = new tensors.Assembler();
  assert.equal(assembler.add('w', pieces[0]), null);
  assert.equal(assembler.add('w', pieces[1]), null);
  assert.deepEqual(assembler.pending, ['w']);
  const joined = assembler.add('w', pieces[2]);
  assert.deepEqual(joined.shape, [2, 5]);
  assert.deepEqual(joined.data, tensors.decode(whole).data);
  assert.doesNotThrow(() => assembler.finish());

  const gappy = new tensors.Assembler();
  gappy.add('w', pieces[0]);
  assert.throws(() => gappy.add('w', pieces[2]), /chunk at offset 64 arrived after 32 bytes/);
  const unfinished = new tensors.Assembler();
  unfinished.add('w', pieces[0]);
  assert.throws(() => unfinished.finish('Backward stream'), /ended in the middle of chunked tensor\(s\) w/);
  assert.throws(() => tensors.decode(pieces[1], 'w'), /is a chunk/);
});
