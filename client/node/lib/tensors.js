'use strict';
// The chainrule.v1.Tensor wire format (proto/chainrule/v1/tensor.proto) in JavaScript.
//
// A Tensor message is {dtype, shape, data}: `data` holds product(shape) elements of `dtype`,
// little-endian, row-major (C order), no padding; BOOL is one byte (0 or 1) per element and
// `shape = []` is a scalar. In JavaScript a decoded tensor is
//
//     {dtype: 'float64' | 'float32' | 'int32' | 'int64' | 'bool', shape: number[], data}
//
// where `data` is a fresh Float64Array / Float32Array / Int32Array / BigInt64Array, or an
// Array of booleans for 'bool'. Server streams split tensors over 1 MiB into chunks; the
// Assembler below joins them back (see `Tensor` in tensor.proto).

const os = require('node:os');

const LITTLE_ENDIAN_HOST = os.endianness() === 'LE';

// name -> {code (enum name as proto-loader reports it with enums: String), number, itemsize, array type}
const DTYPES = {
  float32: { code: 'DATA_TYPE_FLOAT32', number: 1, itemsize: 4, Array: Float32Array },
  float64: { code: 'DATA_TYPE_FLOAT64', number: 2, itemsize: 8, Array: Float64Array },
  int32: { code: 'DATA_TYPE_INT32', number: 3, itemsize: 4, Array: Int32Array },
  int64: { code: 'DATA_TYPE_INT64', number: 4, itemsize: 8, Array: BigInt64Array },
  bool: { code: 'DATA_TYPE_BOOL', number: 5, itemsize: 1, Array: null },
};
const BY_CODE = {};
for (const [name, spec] of Object.entries(DTYPES)) {
  BY_CODE[spec.code] = name;
  BY_CODE[spec.number] = name;
}

const CHUNK_BYTES = 1 << 20; // the server's chunk size; informational, the Assembler does not rely on it

class TensorError extends Error {
  constructor(message) {
    super(message);
    this.name = 'TensorError';
  }
}

function dtypeName(code) {
  const name = BY_CODE[code];
  if (name === undefined) {
    throw new TensorError(`unsupported dtype ${JSON.stringify(code)}; expected one of ${Object.keys(DTYPES).join(', ')}`);
  }
  return name;
}

function elementCount(shape) {
  let count = 1;
  for (const dim of shape) count *= dim;
  return count;
}

function dtypeOf(value) {
  if (value instanceof Float64Array) return 'float64';
  if (value instanceof Float32Array) return 'float32';
  if (value instanceof Int32Array) return 'int32';
  if (value instanceof BigInt64Array) return 'int64';
  if (typeof value === 'boolean') return 'bool';
  if (typeof value === 'bigint') return 'int64';
  if (typeof value === 'number') return 'float64';
  if (Array.isArray(value)) {
    const flat = value.flat(Infinity);
    if (flat.length && flat.every((v) => typeof v === 'boolean')) return 'bool';
    if (flat.length && flat.every((v) => typeof v === 'bigint')) return 'int64';
    return 'float64';
  }
  throw new TensorError(`cannot infer a dtype for ${Object.prototype.toString.call(value)}`);
}

function shapeOf(value) {
  if (!Array.isArray(value)) return ArrayBuffer.isView(value) ? [value.length] : [];
  const shape = [value.length];
  if (value.length && Array.isArray(value[0])) shape.push(...shapeOf(value[0]).slice());
  return shape;
}

function checkNested(value, shape, path = 'value') {
  if (shape.length === 0) return;
  if (!Array.isArray(value) || value.length !== shape[0]) {
    throw new TensorError(`${path} is ragged: expected ${shape[0]} entries`);
  }
  value.forEach((item, index) => checkNested(item, shape.slice(1), `${path}[${index}]`));
}

/** The little-endian bytes of a typed array (a copy). */
function typedToBuffer(array) {
  const bytes = Buffer.alloc(array.byteLength);
  if (LITTLE_ENDIAN_HOST) {
    bytes.set(new Uint8Array(array.buffer, array.byteOffset, array.byteLength));
    return bytes;
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const size = array.BYTES_PER_ELEMENT;
  for (let i = 0; i < array.length; i += 1) {
    if (array instanceof Float64Array) view.setFloat64(i * size, array[i], true);
    else if (array instanceof Float32Array) view.setFloat32(i * size, array[i], true);
    else if (array instanceof Int32Array) view.setInt32(i * size, array[i], true);
    else view.setBigInt64(i * size, array[i], true);
  }
  return bytes;
}

/**
 * Encode a value as a chainrule.v1.Tensor message (a plain object proto-loader accepts).
 *
 *   encode(new Float32Array([1, 2, 3, 4, 5, 6]), [2, 3])   // a 2x3 float32 matrix
 *   encode(-2)                                            // float64 scalar, shape []
 *   encode([[1, 2], [3, 4]])                              // nested arrays: float64, shape [2, 2]
 *   encode([true, false])                                 // bool, one byte per element
 *   encode(new BigInt64Array([1n]), [1])                  // int64
 *   encode([1, 2, 3], [3], 'int32')                       // explicit dtype for plain numbers
 *
 * `shape` defaults to [length] for typed arrays, the nesting for arrays and [] for scalars.
 * A decoded tensor ({dtype, shape, data}) encodes back to the same message.
 */
function encode(value, shape, dtype) {
  if (value && typeof value === 'object' && !Array.isArray(value) && !ArrayBuffer.isView(value) && 'data' in value) {
    if (Buffer.isBuffer(value.data)) {
      // Already a Tensor message: check it by decoding, then pass it on unchanged.
      decode(value);
      return { dtype: value.dtype, shape: (value.shape || []).map(Number), data: value.data, chunk_offset: 0, more_chunks: false };
    }
    return encode(value.data, shape ?? value.shape, dtype ?? value.dtype);
  }
  const name = dtype ?? dtypeOf(value);
  const spec = DTYPES[name];
  if (spec === undefined) {
    throw new TensorError(`unsupported dtype '${name}'; expected one of ${Object.keys(DTYPES).join(', ')}`);
  }
  let flat;
  if (Array.isArray(value)) {
    const nested = shapeOf(value);
    if (shape === undefined) {
      checkNested(value, nested);
      shape = nested;
    }
    flat = value.flat(Infinity);
  } else if (ArrayBuffer.isView(value)) {
    flat = value;
  } else {
    flat = [value];
  }
  shape = shape ?? (ArrayBuffer.isView(value) ? [value.length] : []);
  if (!shape.every((dim) => Number.isInteger(dim) && dim >= 0)) {
    throw new TensorError(`shape ${JSON.stringify(shape)} must hold non-negative integers`);
  }
  const count = elementCount(shape);
  if (flat.length !== count) {
    throw new TensorError(`${flat.length} elements do not fill shape ${JSON.stringify(shape)} (${count} elements)`);
  }
  let data;
  if (name === 'bool') {
    data = Buffer.alloc(count);
    for (let i = 0; i < count; i += 1) data[i] = flat[i] ? 1 : 0;
  } else {
    const typed = flat instanceof spec.Array ? flat : spec.Array.from(flat, name === 'int64' ? BigInt : Number);
    data = typedToBuffer(typed);
  }
  return { dtype: spec.code, shape: shape.slice(), data, chunk_offset: 0, more_chunks: false };
}

/**
 * Decode a whole chainrule.v1.Tensor message into {dtype, shape, data}; throws TensorError
 * naming `name` when the message is a chunk or its bytes do not match its dtype and shape.
 */
function decode(message, name = 'tensor') {
  if (message === null || message === undefined) throw new TensorError(`tensor '${name}' is missing`);
  if (Number(message.chunk_offset || 0) !== 0 || message.more_chunks) {
    throw new TensorError(`tensor '${name}' is a chunk (chunk_offset ${message.chunk_offset}); reassemble it first`);
  }
  let dtype;
  try {
    dtype = dtypeName(message.dtype);
  } catch (error) {
    throw new TensorError(`tensor '${name}': ${error.message}`);
  }
  const shape = (message.shape || []).map(Number);
  if (!shape.every((dim) => Number.isSafeInteger(dim) && dim >= 0)) {
    throw new TensorError(`tensor '${name}' has a bad shape ${JSON.stringify(message.shape)}`);
  }
  const spec = DTYPES[dtype];
  const count = elementCount(shape);
  const bytes = message.data || Buffer.alloc(0);
  if (bytes.length !== count * spec.itemsize) {
    throw new TensorError(
      `tensor '${name}' has ${bytes.length} bytes of data; shape ${JSON.stringify(shape)} of ${dtype} needs ${count * spec.itemsize}`,
    );
  }
  let data;
  if (dtype === 'bool') {
    data = new Array(count);
    for (let i = 0; i < count; i += 1) {
      if (bytes[i] > 1) throw new TensorError(`tensor '${name}' is bool but byte ${i} is ${bytes[i]}, not 0 or 1`);
      data[i] = bytes[i] === 1;
    }
  } else {
    // Always copy: a received Buffer may start at an offset the typed array cannot be aligned to.
    data = new spec.Array(count);
    if (LITTLE_ENDIAN_HOST) {
      new Uint8Array(data.buffer).set(bytes);
    } else {
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      for (let i = 0; i < count; i += 1) {
        const at = i * spec.itemsize;
        if (dtype === 'float64') data[i] = view.getFloat64(at, true);
        else if (dtype === 'float32') data[i] = view.getFloat32(at, true);
        else if (dtype === 'int32') data[i] = view.getInt32(at, true);
        else data[i] = view.getBigInt64(at, true);
      }
    }
  }
  return { dtype, shape, data };
}

/** The single element of a tensor with one element (a scalar), as a number, bigint or boolean. */
function item(tensor) {
  if (tensor.data.length !== 1) throw new TensorError(`tensor of shape ${JSON.stringify(tensor.shape)} is not a scalar`);
  return tensor.data[0];
}

/** Nested arrays of a decoded tensor, row-major: toNested(t)[i][j] is element (i, j). */
function toNested(tensor) {
  const { shape, data } = tensor;
  if (shape.length === 0) return data[0];
  const build = (axis, offset) => {
    const stride = elementCount(shape.slice(axis + 1));
    const out = [];
    for (let i = 0; i < shape[axis]; i += 1) {
      out.push(axis === shape.length - 1 ? data[offset + i] : build(axis + 1, offset + i * stride));
    }
    return out;
  };
  return build(0, 0);
}

/**
 * Joins chunked tensors back together, keyed by name, as their chunks arrive in order.
 *
 * In server streams a tensor with more than 1 MiB of data arrives as consecutive chunks: each
 * repeats dtype and shape, `data` holds the whole tensor's bytes from `chunk_offset` on, and
 * `more_chunks` is true on every chunk but the last. A whole tensor has chunk_offset 0 and
 * more_chunks false.
 */
class Assembler {
  constructor() {
    this.partial = new Map(); // name -> {first, pieces: Buffer[], length}
  }

  get pending() {
    return [...this.partial.keys()];
  }

  /** The decoded tensor once its last chunk has arrived, else null. */
  add(name, piece) {
    const offset = Number(piece.chunk_offset || 0);
    if (offset === 0 && !piece.more_chunks && !this.partial.has(name)) return decode(piece, name);
    let entry = this.partial.get(name);
    if (entry === undefined) {
      entry = { first: piece, pieces: [], length: 0 };
      this.partial.set(name, entry);
    }
    if (offset !== entry.length) {
      throw new TensorError(`tensor '${name}': chunk at offset ${offset} arrived after ${entry.length} bytes`);
    }
    if (piece.dtype !== entry.first.dtype || (piece.shape || []).join(',') !== (entry.first.shape || []).join(',')) {
      throw new TensorError(`tensor '${name}': a chunk changed dtype or shape mid-tensor`);
    }
    entry.pieces.push(piece.data);
    entry.length += piece.data.length;
    if (piece.more_chunks) return null;
    this.partial.delete(name);
    return decode({ dtype: entry.first.dtype, shape: entry.first.shape, data: Buffer.concat(entry.pieces) }, name);
  }

  /** Throws if a tensor is still waiting for chunks (call when its stream has ended). */
  finish(what = 'stream') {
    if (this.partial.size) {
      throw new TensorError(`${what} ended in the middle of chunked tensor(s) ${this.pending.join(', ')}`);
    }
  }
}

/** Encode a {name: value} object (values as `encode` takes them) as a feeds map. */
function encodeMap(values) {
  const out = {};
  for (const [name, value] of Object.entries(values || {})) {
    try {
      out[name] = encode(value);
    } catch (error) {
      if (error instanceof TensorError) throw new TensorError(`${name}: ${error.message}`);
      throw error;
    }
  }
  return out;
}

/** Encode a {name: value} object as a list of NamedTensor messages. */
function encodeNamed(values) {
  return Object.entries(encodeMap(values)).map(([name, tensor]) => ({ name, tensor }));
}

/** Decode a list of whole NamedTensor messages into {name: tensor}. */
function decodeNamed(list) {
  const out = {};
  for (const named of list || []) out[named.name] = decode(named.tensor, named.name);
  return out;
}

module.exports = {
  DTYPES,
  CHUNK_BYTES,
  TensorError,
  encode,
  decode,
  item,
  toNested,
  Assembler,
  encodeMap,
  encodeNamed,
  decodeNamed,
  dtypeName,
};
