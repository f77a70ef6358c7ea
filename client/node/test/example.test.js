'use strict';
// examples/lecture.js end to end: it must run and print the lecture's numbers.

const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { execFile } = require('node:child_process');
const { promisify } = require('node:util');
const { serverAddress } = require('./support');

test('examples/lecture.js prints f = -12, the gradients and 20 decreasing training losses', async () => {
  const address = serverAddress();
  const script = path.join(__dirname, '..', 'examples', 'lecture.js');
  const { stdout } = await promisify(execFile)(process.execPath, [script], {
    env: { ...process.env, CHAINRULE_ADDRESS: address },
    timeout: 60000,
  });
  const lines = stdout.split('\n');
  for (const line of ['f = -12', 'df/dx = -4', 'df/dy = -4', 'df/dz = 3']) {
    assert.ok(lines.includes(line), `missing "${line}" in:\n${stdout}`);
  }
  assert.match(stdout, /^d\(-J\)\/dalpha = \[\[/m);
  assert.match(stdout, /^d\(-J\)\/dbeta = \[/m);
  const losses = [...stdout.matchAll(/^step +(\d+) +loss ([\d.]+)$/gm)].map((match) => Number(match[2]));
  assert.equal(losses.length, 20, stdout);
  assert.ok(losses[19] < losses[0], stdout);
});
