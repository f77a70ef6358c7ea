'use strict';
// The lecture's examples against the server at CHAINRULE_ADDRESS, checked against hand-derived numbers.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { GraphBuilder, tensors } = require('..');
const { connect, assertClose } = require('./support');

const sigmoid = (v) => 1 / (1 + Math.exp(-v));

describe('f = (x + y) z', () => {
  let client;
  before(async () => {
    client = await connect();
  });
  after(() => client && client.close());

  it('gives f = -12 and the gradients -4, -4, 3 at x = -2, y = 5, z = -4', async () => {
    const g = new GraphBuilder('lecture');
    // nodes out of order on purpose: the server sorts them
    g.op('mul', 'f', ['q', 'z']);
    g.op('add', 'q', ['x', 'y']);
    for (const name of ['x', 'y', 'z']) g.input(name);
    const info = await client.createGraph(g.build());
    assert.deepEqual(info.inputs, ['x', 'y', 'z']);
    const result = await client.backward(info.graph_id, { feeds: { x: -2, y: 5, z: -4 }, loss: 'f', wrt: ['x', 'y', 'z'] });
    assert.equal(tensors.item(result.loss), -12);
    assert.equal(tensors.item(result.gradients.x), -4);
    assert.equal(tensors.item(result.gradients.y), -4);
    assert.equal(tensors.item(result.gradients.z), 3);
    assert.deepEqual(result.gradients.x.shape, []);
    assert.equal(result.gradients.x.dtype, 'float64');
    assert.deepEqual(result.order, ['z', 'y', 'x']); // reverse topological: z's gradient is final first
    const forward = await client.forward(info.graph_id, { x: -2, y: 5, z: -4 }, ['q', 'f']);
    assert.equal(tensors.item(forward.q), 3);
    assert.equal(tensors.item(forward.f), -12);
    await client.deleteGraph(info.graph_id);
  });
});

// ---------------------------------------------------------------- the 2-layer sigmoid network
const M = 3;
const D = 4;
const ALPHA = [
  [0.5, -0.3, 0.8],
  [-0.6, 0.2, 0.4],
  [0.1, 0.7, -0.5],
  [0.3, -0.9, 0.2],
];
const BETA = [0.7, -0.4, 0.6, -0.2];

function network(alpha = ALPHA, beta = BETA) {
  const g = new GraphBuilder('lecture: 2-layer sigmoid network');
  g.input('x', { dtype: 'float64' });
  g.input('y_star', { dtype: 'float64' });
  g.parameter('alpha', alpha);
  g.parameter('beta', beta);
  g.op('matmul', 'a', ['alpha', 'x']); // a_j = sum_i alpha_ji x_i
  g.op('sigmoid', 'z', ['a']);
  g.op('matmul', 'b', ['beta', 'z']); // b = sum_j beta_j z_j
  g.op('sigmoid', 'y', ['b']);
  g.op('sigmoid_cross_entropy', 'loss', ['b', 'y_star']); // softplus(b) - b y* = -J
  return g.build();
}

/** The lecture's backward formulas for J = y* log y + (1 - y*) log(1 - y), one line each. */
function byHand(alpha, beta, x, yStar) {
  const a = alpha.map((row) => row.reduce((sum, w, i) => sum + w * x[i], 0));
  const z = a.map(sigmoid);
  const b = beta.reduce((sum, w, j) => sum + w * z[j], 0);
  const y = sigmoid(b);
  const J = yStar * Math.log(y) + (1 - yStar) * Math.log(1 - y);
  const dJdy = yStar / y + (1 - yStar) / (y - 1);
  const dJdb = (dJdy * Math.exp(-b)) / (Math.exp(-b) + 1) ** 2;
  const dJdbeta = z.map((zj) => dJdb * zj);
  const dJdz = beta.map((bj) => dJdb * bj);
  const dJda = dJdz.map((g, j) => (g * Math.exp(-a[j])) / (Math.exp(-a[j]) + 1) ** 2);
  const dJdalpha = dJda.map((g) => x.map((xi) => g * xi));
  // a_j depends on x_i for every j, so the chain rule sums over j: dJ/dx_i = sum_j dJ/da_j alpha_ji
  const dJdx = x.map((_, i) => dJda.reduce((sum, g, j) => sum + g * alpha[j][i], 0));
  return { J, y, a, z, b, dJdy, dJdb, dJdbeta, dJdz, dJda, dJdalpha, dJdx };
}

const negate = (values) => values.flat().map((v) => -v);

describe('the 2-layer sigmoid network', () => {
  let client;
  let graphId;
  let topologicalOrder;
  before(async () => {
    client = await connect();
    const info = await client.createGraph(network(), { view: 'full' });
    graphId = info.graph_id;
    topologicalOrder = info.topological_order;
  });
  after(async () => {
    if (client) {
      if (graphId) await client.deleteGraph(graphId).catch(() => {});
      client.close();
    }
  });

  for (const [x, yStar] of [
    [[0.5, -1.0, 2.0], 1],
    [[-1.25, 0.75, 0.1], 0],
  ]) {
    it(`matches the lecture's gradients at x = ${JSON.stringify(x)}, y* = ${yStar}`, async () => {
      const want = byHand(ALPHA, BETA, x, yStar);
      const wrt = ['y', 'b', 'beta', 'z', 'a', 'alpha', 'x'];
      const got = await client.backward(graphId, { feeds: { x, y_star: yStar }, loss: 'loss', wrt });
      // the server differentiates loss = -J, so every gradient is minus the lecture's
      assertClose(tensors.item(got.loss), -want.J, { what: 'loss' });
      assertClose(got.gradients.b.data, [-want.dJdb], { what: 'dloss/db' });
      assertClose(got.gradients.b.data, [want.y - yStar], { what: 'dloss/db = y - y*' });
      assertClose(got.gradients.beta.data, negate(want.dJdbeta), { what: 'dloss/dbeta' });
      assertClose(got.gradients.z.data, negate(want.dJdz), { what: 'dloss/dz' });
      assertClose(got.gradients.a.data, negate(want.dJda), { what: 'dloss/da' });
      assert.deepEqual(got.gradients.alpha.shape, [D, M]);
      assertClose(got.gradients.alpha.data, negate(want.dJdalpha), { what: 'dloss/dalpha' });
      assert.deepEqual(got.gradients.x.shape, [M]);
      assertClose(got.gradients.x.data, negate(want.dJdx), { what: 'dloss/dx' });
      // y does not lie on the path to the loss (the loss reads b): its gradient is zeros
      assert.deepEqual(Array.from(got.gradients.y.data), [0]);
      const reversed = [...topologicalOrder].reverse().filter((name) => wrt.includes(name));
      assert.deepEqual(got.order, reversed, 'gradients arrive in reverse topological order');
      // the slide's version without the sum over j would be a different number
      const withoutSum = x.map((_, i) => want.dJda[i % D] * ALPHA[i % D][i]);
      assert.notDeepEqual(Array.from(got.gradients.x.data), negate(withoutSum));
    });
  }

  it('wrt = [] gives every parameter', async () => {
    const got = await client.backward(graphId, { feeds: { x: [0.5, -1.0, 2.0], y_star: 1 }, loss: 'loss' });
    assert.deepEqual(Object.keys(got.gradients).sort(), ['alpha', 'beta']);
  });
});

describe('Train on the 2-layer network', () => {
  let client;
  before(async () => {
    client = await connect();
  });
  after(() => client && client.close());

  it('lowers the loss at every one of 20 SGD steps, and the streamed updates replay exactly', async () => {
    const graphId = (await client.createGraph(network())).graph_id;
    const n = 24;
    const x = new Float64Array(M * n); // [M, n], one example per column
    const yStar = new Float64Array(n);
    for (let k = 0; k < n; k += 1) {
      const features = [Math.sin(1.7 * k + 0.3), Math.cos(0.9 * k), ((k % 5) - 2) / 2];
      features.forEach((value, i) => {
        x[i * n + k] = value;
      });
      yStar[k] = features[0] - features[1] + 0.5 * features[2] > 0 ? 1 : 0;
    }
    const batch = { x: tensors.encode(x, [M, n]), y_star: tensors.encode(yStar, [n]) };
    const before = await client.getParameters(graphId);
    assert.equal(before.step, 0);
    const initialLoss = tensors.item((await client.forward(graphId, batch, ['loss'])).loss);

    async function* batches() {
      for (let i = 0; i < 20; i += 1) yield batch;
    }
    const seen = [];
    const steps = await client.train(
      {
        graph_id: graphId,
        loss: 'loss',
        optimizer: { sgd: { learning_rate: 2.0 } },
        stream_gradients: true,
        stream_updates: true,
      },
      batches(),
      { onStep: (step) => seen.push(step.step) },
    );
    assert.deepEqual(seen, Array.from({ length: 20 }, (_, i) => i + 1));
    assert.deepEqual(steps.map((s) => s.step), seen);
    const losses = steps.map((s) => s.loss);
    assertClose(losses[0], initialLoss, { what: 'loss of step 1 (before its update)' });
    for (let i = 1; i < losses.length; i += 1) {
      assert.ok(losses[i] < losses[i - 1], `loss rose at step ${i + 1}: ${losses[i - 1]} -> ${losses[i]}`);
    }
    assert.ok(losses[19] < 0.5 * losses[0], `loss only went from ${losses[0]} to ${losses[19]}`);

    // SGD: update = -learning_rate * gradient, and the stored parameters are initial + sum(updates), bit for bit
    const expected = {
      alpha: Float64Array.from(before.parameters.alpha.data),
      beta: Float64Array.from(before.parameters.beta.data),
    };
    for (const step of steps) {
      for (const name of ['alpha', 'beta']) {
        const update = step.updates[name].data;
        const gradient = step.gradients[name].data;
        update.forEach((u, i) => {
          assert.equal(u, -2.0 * gradient[i]);
          expected[name][i] += u;
        });
      }
    }
    const after = await client.getParameters(graphId);
    assert.equal(after.step, 20);
    assert.deepEqual(after.parameters.alpha.data, expected.alpha);
    assert.deepEqual(after.parameters.beta.data, expected.beta);
    await client.deleteGraph(graphId);
  });
});
