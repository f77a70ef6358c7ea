'use strict';
// @chainrule/client: a Node.js client for chainrule.v1.GraphService.
//
//   const { Client, GraphBuilder, tensors } = require('@chainrule/client');
//   const client = new Client('127.0.0.1:50051');
//   const info = await client.createGraph(graph.build());
//   const { loss, gradients } = await client.backward(info.graph_id, { feeds, loss: 'f', wrt: ['x'] });

const tensors = require('./lib/tensors');
const { GraphBuilder, attrValue } = require('./lib/graph');
const { Client, loadPackage, PROTO_DIR, LOADER_OPTIONS } = require('./lib/client');
const { ChainruleError, statusDetails } = require('./lib/errors');

module.exports = {
  Client,
  GraphBuilder,
  attrValue,
  tensors,
  ChainruleError,
  statusDetails,
  loadPackage,
  PROTO_DIR,
  LOADER_OPTIONS,
};
