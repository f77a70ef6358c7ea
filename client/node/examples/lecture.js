#!/usr/bin/env node
'use strict';
// The lecture's two examples against a running chainrule server, from Node.js.
//
//   CHAINRULE_ADDRESS=127.0.0.1:50051 node examples/lecture.js     (or pass host:port as argument)
//
// 1. f = (x + y) z at x = -2, y = 5, z = -4: f = -12, df/dx = -4, df/dy = -4, df/dz = 3.
// 2. The 2-layer sigmoid network
//        a_j = sum_i alpha_ji x_i,  z_j = sigmoid(a_j),  b = sum_j beta_j z_j,  y = sigmoid(b)
//        J = y* log y + (1 - y*) log(1 - y)
//    with the loss sigmoid_cross_entropy(b, y*) = softplus(b) - b y* = -J (for one example):
//    one Backward for the parameters alpha and beta, then 20 SGD steps over a Train stream on a
//    small fixed dataset (x as a 3 x N matrix, one example per column, so the same graph serves;
//    the loss is then the mean of -J over the examples).

const { Client, GraphBuilder, tensors } = require('..');

const M = 3; // inputs
const D = 4; // hidden units
const ALPHA = [
  [0.5, -0.3, 0.8],
  [-0.6, 0.2, 0.4],
  [0.1, 0.7, -0.5],
  [0.3, -0.9, 0.2],
]; // D x M: alpha[j][i] weighs x_i into a_j
const BETA = [0.7, -0.4, 0.6, -0.2];

function lectureGraph() {
  const g = new GraphBuilder('lecture: f = (x + y) z');
  const [x, y, z] = ['x', 'y', 'z'].map((name) => g.input(name, { dtype: 'float64', shape: [] }));
  const q = g.op('add', 'q', [x, y]);
  g.op('mul', 'f', [q, z]);
  return g.build();
}

function twoLayerGraph() {
  const g = new GraphBuilder('lecture: 2-layer sigmoid network');
  const x = g.input('x', { dtype: 'float64' }); // [M] for one example, [M, N] for N examples (columns)
  const yStar = g.input('y_star', { dtype: 'float64' }); // [] or [N]
  const alpha = g.parameter('alpha', tensors.encode(ALPHA));
  const beta = g.parameter('beta', tensors.encode(BETA));
  const a = g.op('matmul', 'a', [alpha, x]);
  const z = g.op('sigmoid', 'z', [a]);
  const b = g.op('matmul', 'b', [beta, z]);
  g.op('sigmoid', 'y', [b]);
  g.op('sigmoid_cross_entropy', 'loss', [b, yStar]); // = -J
  return g.build();
}

/** A fixed dataset: N points in R^3, labelled by the side of a plane. */
function dataset(n = 24) {
  const x = new Float64Array(M * n); // row-major [M, n]: x[i * n + k] is feature i of example k
  const yStar = new Float64Array(n);
  for (let k = 0; k < n; k += 1) {
    const features = [Math.sin(1.7 * k + 0.3), Math.cos(0.9 * k), ((k % 5) - 2) / 2];
    features.forEach((value, i) => {
      x[i * n + k] = value;
    });
    yStar[k] = features[0] - features[1] + 0.5 * features[2] > 0 ? 1 : 0;
  }
  return { x: tensors.encode(x, [M, n]), y_star: tensors.encode(yStar, [n]) };
}

const fmt = (tensor) => JSON.stringify(tensors.toNested(tensor), (key, value) => (typeof value === 'number' ? +value.toFixed(6) : value));

async function main() {
  const address = process.argv[2] || process.env.CHAINRULE_ADDRESS || '127.0.0.1:50051';
  const client = new Client(address, { deadlineMs: 60000 });
  try {
    await client.waitForReady();

    // 1. f = (x + y) z
    const lecture = await client.createGraph(lectureGraph());
    const simple = await client.backward(lecture.graph_id, {
      feeds: { x: -2, y: 5, z: -4 },
      loss: 'f',
      wrt: ['x', 'y', 'z'],
    });
    console.log(`f = ${tensors.item(simple.loss)}`);
    for (const name of ['x', 'y', 'z']) console.log(`df/d${name} = ${tensors.item(simple.gradients[name])}`);
    await client.deleteGraph(lecture.graph_id);

    // 2. the 2-layer network: gradients of -J for the parameters (wrt = [] means every parameter)
    const network = await client.createGraph(twoLayerGraph());
    const example = { x: [0.5, -1.0, 2.0], y_star: 1.0 };
    const { loss, gradients, order } = await client.backward(network.graph_id, { feeds: example, loss: 'loss' });
    console.log(`\n2-layer network at x = ${JSON.stringify(example.x)}, y* = ${example.y_star}`);
    console.log(`loss = -J = ${tensors.item(loss).toFixed(6)}`);
    for (const name of order) console.log(`d(-J)/d${name} = ${fmt(gradients[name])}`);

    // 3. training: 20 SGD steps, the whole dataset as every batch
    const batch = dataset();
    const steps = await client.train(
      { graph_id: network.graph_id, loss: 'loss', optimizer: { sgd: { learning_rate: 2.0 } } },
      Array.from({ length: 20 }, () => batch),
      { onStep: (step) => console.log(`step ${String(step.step).padStart(2)}  loss ${step.loss.toFixed(6)}`) },
    );
    const { parameters } = await client.getParameters(network.graph_id);
    console.log(`\nafter ${steps.length} steps: alpha = ${fmt(parameters.alpha)}`);
    console.log(`                     beta = ${fmt(parameters.beta)}`);
    await client.deleteGraph(network.graph_id);
  } finally {
    client.close();
  }
}

main().catch((error) => {
  console.error(error);
  process.exitCode = 1;
});
