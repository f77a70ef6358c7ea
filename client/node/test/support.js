'use strict';
// Shared by the test files (not itself a test file: `npm test` runs test/*.test.js).

const { Client } = require('..');

const HOW_TO = [
  'CHAINRULE_ADDRESS is not set: these tests run against a live chainrule server.',
  'Start one and point the tests at it, e.g.',
  '  chainrule serve --port 0 --db /tmp/chainrule-node.db     # prints "chainrule serving on HOST:PORT"',
  '  CHAINRULE_ADDRESS=HOST:PORT npm test',
].join('\n');

/** The server's host:port from CHAINRULE_ADDRESS; throws (failing the test, never skipping it) when unset. */
function serverAddress() {
  const address = (process.env.CHAINRULE_ADDRESS || '').trim();
  if (!address) throw new Error(HOW_TO);
  return address;
}

/** A connected Client for the server at CHAINRULE_ADDRESS. */
async function connect() {
  const client = new Client(serverAddress(), { deadlineMs: 60000 });
  try {
    await client.waitForReady(15000);
  } catch (error) {
    client.close();
    throw error;
  }
  return client;
}

/** |got - want| <= atol + rtol * |want|, elementwise, with the index in the message. */
function assertClose(got, want, { rtol = 1e-12, atol = 1e-14, what = 'value' } = {}) {
  const a = ArrayBuffer.isView(got) || Array.isArray(got) ? Array.from(got) : [got];
  const b = ArrayBuffer.isView(want) || Array.isArray(want) ? Array.from(want) : [want];
  if (a.length !== b.length) throw new Error(`${what}: ${a.length} elements, expected ${b.length}`);
  for (let i = 0; i < a.length; i += 1) {
    if (!(Math.abs(a[i] - b[i]) <= atol + rtol * Math.abs(b[i]))) {
      throw new Error(`${what}[${i}] = ${a[i]}, expected ${b[i]} (rtol ${rtol}, atol ${atol})`);
    }
  }
}

module.exports = { serverAddress, connect, assertClose, HOW_TO };
