'use strict';
// A tiny builder for chainrule.v1.Graph messages as plain objects.
//
//   const g = new GraphBuilder('lecture');
//   const x = g.input('x'), y = g.input('y'), z = g.input('z');
//   const q = g.op('add', 'q', [x, y]);
//   g.op('mul', 'f', [q, z]);
//   await client.createGraph(g.build());
//
// Every method returns the node's name, so results can be passed straight on as inputs.
// The op names and their attrs are the server's (server/ops.py): input, parameter, constant,
// add, sub, mul, div, pow, maximum, minimum, neg, exp, log, sqrt, abs, square, sigmoid, tanh,
// relu, softplus, log_sigmoid, matmul, sum, mean, max, logsumexp (attrs axes, keepdims),
// reshape (shape), transpose (perm), softmax, log_softmax (axis), softmax_cross_entropy,
// sigmoid_cross_entropy.

const tensors = require('./tensors');

/**
 * A chainrule.v1.AttrValue from a JavaScript value: boolean -> b, string -> s, integer -> i,
 * other number -> f, array of integers -> ints, other array of numbers -> floats. An object
 * that already names its kind ({f: 2}, {ints: {values: [0]}}) is passed through.
 */
function attrValue(value) {
  if (typeof value === 'boolean') return { b: value };
  if (typeof value === 'string') return { s: value };
  if (typeof value === 'bigint') return { i: value.toString() };
  if (typeof value === 'number') return Number.isInteger(value) ? { i: value } : { f: value };
  if (Array.isArray(value)) {
    return value.every((v) => Number.isInteger(v) || typeof v === 'bigint')
      ? { ints: { values: value.map((v) => (typeof v === 'bigint' ? v.toString() : v)) } }
      : { floats: { values: value } };
  }
  if (value && typeof value === 'object') return value;
  throw new TypeError(`cannot express ${String(value)} as an AttrValue`);
}

class GraphBuilder {
  constructor(name = '') {
    this.name = name;
    this.nodes = [];
    this.names = new Set();
  }

  /** Add a node: node(name, op, inputs = [], attrs = {}, value = undefined) -> name. */
  node(name, op, inputs = [], attrs = {}, value = undefined) {
    if (this.names.has(name)) throw new Error(`node '${name}' is already defined`);
    this.names.add(name);
    const message = { name, op, inputs: [...inputs], attrs: {} };
    for (const [key, attr] of Object.entries(attrs || {})) {
      if (attr !== undefined) message.attrs[key] = attrValue(attr);
    }
    if (value !== undefined) message.value = tensors.encode(value);
    this.nodes.push(message);
    return name;
  }

  /** An "input" node fed at call time; dtype ('float64'...) and shape (-1 = any size) are optional. */
  input(name, { dtype, shape } = {}) {
    return this.node(name, 'input', [], { dtype, shape });
  }

  /** A trainable "parameter" node; `value` is anything tensors.encode takes (float32 or float64). */
  parameter(name, value) {
    return this.node(name, 'parameter', [], {}, value);
  }

  constant(name, value) {
    return this.node(name, 'constant', [], {}, value);
  }

  /** Any computed op: op('matmul', 'a', ['x', 'w']) or op('sum', 's', ['x'], {axes: [0]}). */
  op(op, name, inputs, attrs = {}) {
    return this.node(name, op, inputs, attrs);
  }

  build() {
    return { name: this.name, nodes: this.nodes.map((node) => ({ ...node })) };
  }
}

module.exports = { GraphBuilder, attrValue };
