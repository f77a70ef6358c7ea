'use strict';
// A promise-based client for chainrule.v1.GraphService, loading the repository's protos at run time.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const tensors = require('./tensors');
const { wrapError } = require('./errors');

/** The repository's proto/ directory: the include root of chainrule/v1/*.proto. */
const PROTO_DIR = path.resolve(__dirname, '..', '..', '..', 'proto');
const LOADER_OPTIONS = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  // google/protobuf/timestamp.proto is not in proto/: proto-loader supplies the well-known types.
  includeDirs: [PROTO_DIR],
};

/** The server's default --max-message-mb: the client receives what the server accepts, not gRPC's 4 MiB. */
const DEFAULT_MAX_MESSAGE_MB = 512;
const MIB = 1024 * 1024;
const RECEIVE_LIMIT_OPTION = 'grpc.max_receive_message_length';

/** GraphView by the short names the methods take ('basic', 'full') or by its proto names. */
const VIEWS = {
  basic: 'GRAPH_VIEW_BASIC',
  full: 'GRAPH_VIEW_FULL',
  GRAPH_VIEW_BASIC: 'GRAPH_VIEW_BASIC',
  GRAPH_VIEW_FULL: 'GRAPH_VIEW_FULL',
};

function graphView(view) {
  if (view === undefined) return 'GRAPH_VIEW_UNSPECIFIED';
  const name = VIEWS[view];
  if (name === undefined) throw new Error(`view must be 'basic' or 'full', got ${JSON.stringify(view)}`);
  return name;
}

let cachedPackage = null;

/** The loaded chainrule.v1 package (message types and the GraphService constructor). */
function loadPackage() {
  if (cachedPackage === null) {
    const definition = protoLoader.loadSync(
      [
        'chainrule/v1/graph_service.proto',
        'chainrule/v1/dataset_service.proto',
        'chainrule/v1/job_service.proto',
      ],
      LOADER_OPTIONS,
    );
    cachedPackage = grpc.loadPackageDefinition(definition).chainrule.v1;
  }
  return cachedPackage;
}

function callOptions(deadlineMs) {
  return deadlineMs ? { deadline: new Date(Date.now() + deadlineMs) } : {};
}

function graphInfo(info) {
  if (!info) return info;
  return { ...info, step: Number(info.step), node_count: Number(info.node_count) };
}

/** A Dataset message with its int64 fields as numbers and its dtypes by name ('float32', ...). */
function datasetInfo(dataset) {
  return {
    ...dataset,
    columns: dataset.columns.map((column) => ({
      name: column.name,
      dtype: tensors.dtypeName(column.dtype),
      shape: column.shape.map(Number),
    })),
    num_examples: Number(dataset.num_examples),
    size_bytes: Number(dataset.size_bytes),
  };
}

const JOB_STATE_PREFIX = 'JOB_STATE_';

/** A job's state by its short name ('queued', 'running', 'succeeded', 'failed', 'cancelled'). */
function jobState(state) {
  return state === 'JOB_STATE_UNSPECIFIED' ? null : state.slice(JOB_STATE_PREFIX.length).toLowerCase();
}

/** A Job message with its int64 fields as numbers and its state by its short name. */
function jobInfo(job) {
  return {
    ...job,
    state: jobState(job.state),
    step: Number(job.step),
    total_steps: Number(job.total_steps),
    epoch: Number(job.epoch),
  };
}

/** A JobEvent: a step ({step, epoch, loss, learning_rate, metrics}, state null) or a change of state (state set). */
function jobEvent(event) {
  const state = jobState(event.state);
  if (state !== null) return { state };
  return {
    step: Number(event.step),
    epoch: Number(event.epoch),
    loss: event.loss,
    learning_rate: event.learning_rate,
    metrics: event.metrics,
    state: null,
  };
}

/**
 * Follows a response stream to its end: `onData(message)` for each message, then once
 * `onDone(error)` with null on success or the grpc-js error. grpc-js emits 'error' (or an OK
 * 'status') when the trailers arrive but may still hold messages for 'data' until 'end', so the
 * outcome is only reported once both 'end' and the status have come: a failing stream's
 * messages before the failure are all delivered first.
 */
function followStream(call, onData, onDone) {
  let ended = false;
  let status = null;
  let error = null;
  let reported = false;
  const report = () => {
    if (reported || !ended || (status === null && error === null)) return;
    reported = true;
    if (error === null && status.code !== grpc.status.OK) {
      error = Object.assign(new Error(`${status.code} ${status.details}`), status);
    }
    onDone(error);
  };
  call.on('data', onData);
  call.on('error', (e) => {
    error = e;
    report();
  });
  call.on('status', (s) => {
    status = s;
    report();
  });
  call.on('end', () => {
    ended = true;
    report();
  });
}

/** Events a watch holds for a busy reader before it pauses the stream (the server keeps the rest). */
const WATCH_BUFFER = 256;
const RETRY_DELAY_MS = 1000;

/**
 * The messages of a response stream as an async iterator that throws the stream's error after
 * its last message. It pauses the stream while WATCH_BUFFER messages wait for the reader (gRPC's
 * flow control then holds the server back) and cancels the call when the reader leaves early or
 * `signal` aborts.
 */
async function* messagesOf(call, signal) {
  const waiting = [];
  let done = false;
  let failure = null;
  let paused = false;
  let wake = null;
  const notify = () => {
    if (wake !== null) wake();
    wake = null;
  };
  followStream(
    call,
    (message) => {
      waiting.push(message);
      if (!paused && waiting.length >= WATCH_BUFFER) {
        paused = true;
        call.pause();
      }
      notify();
    },
    (error) => {
      done = true;
      failure = error;
      notify();
    },
  );
  const abort = () => call.cancel();
  if (signal) signal.addEventListener('abort', abort, { once: true });
  try {
    if (signal && signal.aborted) abort();
    while (true) {
      if (waiting.length > 0) {
        const message = waiting.shift();
        if (paused && waiting.length <= WATCH_BUFFER / 2) {
          paused = false;
          call.resume();
        }
        if (signal && signal.aborted) return;
        yield message;
      } else if (done) {
        if (failure !== null) throw failure;
        return;
      } else {
        await new Promise((resolve) => {
          wake = resolve;
        });
      }
    }
  } finally {
    if (signal) signal.removeEventListener('abort', abort);
    if (!done) call.cancel();
  }
}

/** Resolves after `ms`, or at once when `signal` aborts. */
function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      if (signal) signal.removeEventListener('abort', done);
      resolve();
    }
    if (signal) signal.addEventListener('abort', done, { once: true });
  });
}

/** Resolves when `emitter` emits `event`, or when `stop` resolves first. */
function onceOr(emitter, event, stop) {
  return new Promise((resolve) => {
    const done = () => {
      emitter.removeListener(event, done);
      resolve();
    };
    emitter.once(event, done);
    stop.then(done, done);
  });
}

class Client {
  /**
   * address: "host:port". options: {credentials (default insecure), deadlineMs (per call,
   * default none), maxMessageMb (the largest message received, default 512 MiB: the server's
   * default --max-message-mb, where grpc-js would stop at 4 MiB), channelOptions (grpc-js
   * channel options; a 'grpc.max_receive_message_length' there overrides maxMessageMb)}.
   */
  constructor(address, { credentials, deadlineMs, channelOptions, maxMessageMb = DEFAULT_MAX_MESSAGE_MB } = {}) {
    if (!address) throw new Error('Client needs an address such as "127.0.0.1:50051"');
    if (!Number.isInteger(maxMessageMb) || maxMessageMb < 1 || maxMessageMb > 2047) {
      throw new Error(`maxMessageMb must be a whole number from 1 to 2047, got ${maxMessageMb}`);
    }
    const { GraphService, DatasetService, JobService } = loadPackage();
    this.address = address;
    this.deadlineMs = deadlineMs;
    const options = { [RECEIVE_LIMIT_OPTION]: maxMessageMb * MIB, ...(channelOptions || {}) };
    this.stub = new GraphService(address, credentials || grpc.credentials.createInsecure(), options);
    this.datasetStub = new DatasetService(address, credentials || grpc.credentials.createInsecure(), {
      channelOverride: this.stub.getChannel(),
    });
    this.jobStub = new JobService(address, credentials || grpc.credentials.createInsecure(), {
      channelOverride: this.stub.getChannel(),
    });
  }

  close() {
    this.stub.close();
  }

  /** Resolves once the channel is connected; rejects after timeoutMs. */
  waitForReady(timeoutMs = 10000) {
    return new Promise((resolve, reject) => {
      this.stub.waitForReady(new Date(Date.now() + timeoutMs), (error) => {
        if (error) reject(new Error(`cannot reach chainrule at ${this.address}: ${error.message}`));
        else resolve();
      });
    });
  }

  /**
   * Any unary method by its proto name, with a raw request object; resolves to the raw response.
   * `stub` is this.stub (GraphService) unless given, e.g. this.datasetStub (DatasetService).
   */
  unary(method, request, stub = this.stub) {
    return new Promise((resolve, reject) => {
      stub[method](request, callOptions(this.deadlineMs), (error, response) => {
        if (error) reject(wrapError(error));
        else resolve(response);
      });
    });
  }

  /**
   * Stores a graph ({name, nodes}, e.g. GraphBuilder.build()); resolves to its GraphInfo, in the
   * 'basic' view unless `view` is 'full' (basic leaves topological_order empty). With a
   * `requestId` (e.g. crypto.randomUUID()), a retry with the same id and graph within a day
   * resolves to the graph stored the first time instead of storing a copy.
   */
  async createGraph(graph, { view, requestId = '' } = {}) {
    const response = await this.unary('CreateGraph', { graph, view: graphView(view), request_id: requestId });
    return graphInfo(response.graph);
  }

  /**
   * Stores an ONNX model (a Buffer or Uint8Array holding a serialized ModelProto, self-contained)
   * as a graph whose nodes carry the ONNX value names; resolves to {graph: GraphInfo (basic view),
   * outputs: the node names of the ONNX graph's outputs}. `frozen` float initializers stay
   * constants instead of becoming trainable parameters; `name` empty keeps the ONNX graph's name.
   */
  async importOnnx(model, { name = '', frozen = [] } = {}) {
    const response = await this.unary('ImportOnnx', { name, model, frozen });
    return { graph: graphInfo(response.graph), outputs: response.outputs };
  }

  /**
   * Resolves to {graph: GraphInfo, definition: Graph | null}; the GraphInfo is 'full' unless
   * `view` is 'basic'. `omitParameterValues` leaves the parameters' initial values out of the
   * definition (getParameters gives their current values).
   */
  async getGraph(graphId, { includeDefinition = false, view, omitParameterValues = false } = {}) {
    const response = await this.unary('GetGraph', {
      graph_id: graphId,
      include_definition: includeDefinition,
      view: graphView(view),
      omit_parameter_values: omitParameterValues,
    });
    return { graph: graphInfo(response.graph), definition: response.definition };
  }

  /**
   * One page: resolves to {graphs, nextPageToken}. The GraphInfos are 'basic' (no
   * topological_order) unless `view` is 'full', so a page of large graphs stays small.
   */
  async listGraphs({ pageSize = 0, pageToken = '', view } = {}) {
    const request = { page_size: pageSize, page_token: pageToken, view: graphView(view) };
    const response = await this.unary('ListGraphs', request);
    return { graphs: response.graphs.map(graphInfo), nextPageToken: response.next_page_token };
  }

  async deleteGraph(graphId) {
    await this.unary('DeleteGraph', { graph_id: graphId });
  }

  /**
   * Stores arrays on the server as a dataset that jobs train on. `columns` is {name: value}, each
   * value anything tensors.encode takes (a nested array, a typed array with its shape as
   * tensors.encode(data, shape, dtype), ...) whose first dimension indexes the examples, the same
   * in every column. The bytes stream in 1 MiB chunks, column after column; resolves, once the
   * dataset is durable, to the Dataset: {dataset_id, name, columns: [{name, dtype, shape}],
   * num_examples, size_bytes, sha256, create_time}. `onProgress(sentBytes, totalBytes)` is called
   * as chunks are handed to gRPC.
   */
  async uploadDataset(name, columns, { onProgress } = {}) {
    const encoded = Object.entries(columns).map(([column, value]) => [column, tensors.encode(value)]);
    if (encoded.length === 0) throw new Error('a dataset needs at least one column');
    const counts = encoded.map(([column, tensor]) => {
      if (tensor.shape.length === 0) {
        throw new Error(`column '${column}' is a scalar; every column needs a first axis, one entry per example`);
      }
      return tensor.shape[0];
    });
    if (new Set(counts).size > 1) {
      const listed = encoded.map(([column], index) => `'${column}' ${counts[index]}`).join(', ');
      throw new Error(`every column needs the same number of examples (first dimension); got ${listed}`);
    }
    const header = {
      name,
      columns: encoded.map(([column, tensor]) => ({ name: column, dtype: tensor.dtype, shape: tensor.shape.slice(1) })),
      num_examples: counts[0],
    };
    const total = encoded.reduce((sum, [, tensor]) => sum + tensor.data.length, 0);
    return new Promise((resolve, reject) => {
      let ended = false;
      const call = this.datasetStub.UploadDataset(callOptions(0), (error, response) => {
        ended = true;
        if (error) reject(wrapError(error));
        else resolve(datasetInfo(response));
      });
      const finished = new Promise((settle) => call.on('status', settle));
      const send = async () => {
        let sent = 0;
        if (!call.write({ header })) await onceOr(call, 'drain', finished);
        for (const [column, tensor] of encoded) {
          for (let start = 0; start < tensor.data.length && !ended; start += tensors.CHUNK_BYTES) {
            const data = tensor.data.subarray(start, start + tensors.CHUNK_BYTES);
            const more = call.write({ chunk: { column, data } });
            sent += data.length;
            if (onProgress) onProgress(sent, total);
            if (!more) await onceOr(call, 'drain', finished);
          }
        }
        if (!ended) call.end();
      };
      send();
    });
  }

  /** Resolves to the Dataset (see uploadDataset). */
  async getDataset(datasetId) {
    return datasetInfo(await this.unary('GetDataset', { dataset_id: datasetId }, this.datasetStub));
  }

  /** One page, oldest first: resolves to {datasets, nextPageToken}. */
  async listDatasets({ pageSize = 0, pageToken = '' } = {}) {
    const response = await this.unary('ListDatasets', { page_size: pageSize, page_token: pageToken }, this.datasetStub);
    return { datasets: response.datasets.map(datasetInfo), nextPageToken: response.next_page_token };
  }

  /** Refused (FAILED_PRECONDITION) while a queued or running job uses the dataset. */
  async deleteDataset(datasetId) {
    await this.unary('DeleteDataset', { dataset_id: datasetId }, this.datasetStub);
  }

  /**
   * Queues a training job on the server, detached from this client. `spec` is a JobSpec in its
   * proto field names: {graph_id, loss, optimizer: {sgd: {...}} or {adam: {...}}, dataset_id,
   * feeds: {input: column}, batch_size, epochs, max_steps, seed, shuffle, drop_last,
   * evaluation: {metrics, every_steps, ...}, schedule: {cosine: {...}, warmup_steps}, ...}.
   * Resolves to the Job: {job_id, spec, state ('queued', 'running', 'succeeded', 'failed',
   * 'cancelled'), step, total_steps, epoch, loss, metrics, error, create_time, start_time, end_time}.
   */
  async createJob(spec) {
    return jobInfo(await this.unary('CreateJob', { spec }, this.jobStub));
  }

  /** Resolves to the Job (see createJob). */
  async getJob(jobId) {
    return jobInfo(await this.unary('GetJob', { job_id: jobId }, this.jobStub));
  }

  /** One page, oldest first: resolves to {jobs, nextPageToken}; `states` ('running', ...) and `graphId` filter. */
  async listJobs({ pageSize = 0, pageToken = '', states = [], graphId = '' } = {}) {
    const request = {
      page_size: pageSize,
      page_token: pageToken,
      states: states.map((state) => JOB_STATE_PREFIX + state.toUpperCase()),
      graph_id: graphId,
    };
    const response = await this.unary('ListJobs', request, this.jobStub);
    return { jobs: response.jobs.map(jobInfo), nextPageToken: response.next_page_token };
  }

  /** A queued job ends cancelled at once, a running one after its current step; resolves to the Job. */
  async cancelJob(jobId) {
    return jobInfo(await this.unary('CancelJob', { job_id: jobId }, this.jobStub));
  }

  /**
   * A job's events (WatchJob) as an async iterator: its state first, then one per step from
   * `fromStep` (history, then live), with a state event at each change of state, the last being
   * the final state; see jobEvent for their form. It reads at the pace of its reader: while the
   * reader is busy, at most a few hundred events wait here and the server holds the rest, so a
   * slow reader neither misses events nor gathers them in memory. The watch has no deadline (the
   * client's deadlineMs is for unary calls; a job may run for days). With `resume` (the default),
   * a dropped connection or a restarting server (UNAVAILABLE) is watched again after
   * `retryDelayMs`, from the step after the last one seen, so no step is missed or repeated (nor
   * the state seen last). Leaving the loop, or aborting the AbortSignal `signal`, ends the watch.
   */
  async *jobEvents(jobId, { fromStep = 0, signal, resume = true, retryDelayMs = RETRY_DELAY_MS } = {}) {
    let next = fromStep;
    let lastState = null;
    let resumed = false;
    while (!(signal && signal.aborted)) {
      const call = this.jobStub.WatchJob({ job_id: jobId, from_step: next });
      try {
        for await (const message of messagesOf(call, signal)) {
          const event = jobEvent(message);
          if (event.state === null) next = event.step + 1;
          else if (resumed && event.state === lastState) continue; // the state the broken watch last told
          else lastState = event.state;
          resumed = false;
          yield event;
        }
        return;
      } catch (error) {
        if (signal && signal.aborted && error.code === grpc.status.CANCELLED) return;
        if (!resume || error.code !== grpc.status.UNAVAILABLE) throw wrapError(error);
      }
      resumed = true;
      await sleep(retryDelayMs, signal);
    }
  }

  /**
   * Follows a job to its end (see jobEvents, which this reads): resolves to every event received,
   * in order, or with `collect: false` to the last one only (the final state, once the job has
   * ended), for a long job whose events `onEvent(event)` handles as they arrive. Aborting the
   * AbortSignal `signal` stops watching: the promise then resolves to what was received so far.
   */
  async watchJob(jobId, { fromStep = 0, onEvent, signal, collect = true, resume = true, retryDelayMs } = {}) {
    const events = [];
    let last = null;
    for await (const event of this.jobEvents(jobId, { fromStep, signal, resume, retryDelayMs })) {
      if (collect) events.push(event);
      last = event;
      if (onEvent) onEvent(event);
    }
    return collect ? events : last;
  }

  /** Evaluates `fetches`; feeds is {name: value} (see tensors.encode). Resolves to {name: tensor}. */
  async forward(graphId, feeds, fetches) {
    const response = await this.unary('Forward', {
      graph_id: graphId,
      feeds: tensors.encodeMap(feeds),
      fetches,
    });
    return tensors.decodeNamed(response.outputs);
  }

  /**
   * Resolves to {parameters: {name: tensor}, step}: every parameter when `names` is empty. The
   * values stream (StreamParameters) in chunks, so parameters of any size arrive whatever the
   * receive limit.
   */
  getParameters(graphId, names = []) {
    return new Promise((resolve, reject) => {
      const call = this.stub.StreamParameters({ graph_id: graphId, names }, callOptions(this.deadlineMs));
      const assembler = new tensors.Assembler();
      const result = { parameters: {}, step: null };
      let failed = false;
      const fail = (error) => {
        if (failed) return;
        failed = true;
        call.cancel();
        reject(wrapError(error));
      };
      const onData = (response) => {
        if (failed) return;
        try {
          result.step = Number(response.step);
          for (const named of response.parameters) {
            const value = assembler.add(named.name, named.tensor);
            if (value !== null) result.parameters[named.name] = value;
          }
        } catch (error) {
          fail(error);
        }
      };
      followStream(call, onData, (error) => {
        if (failed) return;
        if (error !== null) {
          fail(error);
          return;
        }
        try {
          assembler.finish('StreamParameters stream');
          if (result.step === null) throw new Error('StreamParameters ended without a message');
        } catch (finishError) {
          fail(finishError);
          return;
        }
        resolve(result);
      });
    });
  }

  /** Replaces parameter values ({name: value}); resolves to the graph's step. */
  async setParameters(graphId, values) {
    const response = await this.unary('SetParameters', {
      graph_id: graphId,
      parameters: tensors.encodeNamed(values),
    });
    return Number(response.step);
  }

  /**
   * One forward and one reverse pass. Resolves, when the stream ends, to
   *   {loss: tensor, gradients: {name: tensor}, order: [names in arrival order], messages}
   * where `messages` counts the BackwardResponse messages (more than the gradients when some
   * arrived chunked). `onGradient(name, tensor)` is called as each gradient completes.
   * wrt = [] means every parameter; lossGrad (optional) is the seed gradient of the loss.
   */
  backward(graphId, { feeds = {}, loss, wrt = [], lossGrad, onGradient } = {}) {
    const request = { graph_id: graphId, feeds: tensors.encodeMap(feeds), loss, wrt };
    if (lossGrad !== undefined) request.loss_grad = tensors.encode(lossGrad);
    return new Promise((resolve, reject) => {
      const call = this.stub.Backward(request, callOptions(this.deadlineMs));
      const assembler = new tensors.Assembler();
      const lossChunks = new tensors.Assembler();
      const result = { loss: null, gradients: {}, order: [], messages: 0 };
      let failed = false;
      const fail = (error) => {
        if (failed) return;
        failed = true;
        call.cancel();
        reject(wrapError(error));
      };
      const onData = (response) => {
        if (failed) return;
        try {
          result.messages += 1;
          if (response.loss) {
            const value = lossChunks.add(loss, response.loss);
            if (value !== null) result.loss = value;
          }
          if (!response.gradient) return; // a leading message with only a chunk of a large loss
          const gradient = assembler.add(response.name, response.gradient);
          if (gradient !== null) {
            result.gradients[response.name] = gradient;
            result.order.push(response.name);
            if (onGradient) onGradient(response.name, gradient);
          }
        } catch (error) {
          fail(error);
        }
      };
      followStream(call, onData, (error) => {
        if (failed) return;
        if (error !== null) {
          fail(error);
          return;
        }
        try {
          assembler.finish('Backward stream');
          lossChunks.finish('Backward stream');
        } catch (finishError) {
          fail(finishError);
          return;
        }
        resolve(result);
      });
    });
  }

  /**
   * A Train stream: sends `config` (a TrainConfig: {graph_id, loss, optimizer: {sgd: {...}} or
   * {adam: {...}}, parameters, stream_gradients, stream_updates, checkpoint_every,
   * stop_on_non_finite_loss}), then every batch of `batches` (an iterable or async iterable
   * of {name: value} feeds), then ends its side. Resolves to the list of steps,
   *   {step, loss, gradients: {name: tensor}, updates: {name: tensor}, messages}
   * one per batch, each joined from its messages (more_in_step) and chunks. `onStep(step)` is
   * called as each completes. A server error rejects with a ChainruleError whose `steps`
   * holds the steps completed before it; so does a batch that cannot be encoded (or a batch
   * iterator that throws), after the server has trained the batches sent before it.
   */
  train(config, batches, { onStep } = {}) {
    const call = this.stub.Train(callOptions(this.deadlineMs));
    const steps = [];
    const gradientChunks = new tensors.Assembler();
    const updateChunks = new tensors.Assembler();
    let current = { gradients: {}, updates: {}, messages: 0 };
    let settle;
    const finished = new Promise((resolve) => {
      settle = resolve;
    });
    let outcome = null; // {error} or {steps}
    const finish = (value) => {
      if (outcome === null) {
        outcome = value;
        settle();
      }
    };
    const fail = (error) => {
      if (outcome !== null) return;
      const wrapped = wrapError(error);
      if (wrapped && typeof wrapped === 'object') wrapped.steps = steps;
      call.cancel();
      finish({ error: wrapped });
    };

    const onData = (response) => {
      if (outcome !== null) return;
      try {
        current.messages += 1;
        for (const [list, assembler, into] of [
          [response.gradients, gradientChunks, current.gradients],
          [response.updates, updateChunks, current.updates],
        ]) {
          for (const named of list) {
            const value = assembler.add(named.name, named.tensor);
            if (value !== null) into[named.name] = value;
          }
        }
        if (response.more_in_step) return;
        gradientChunks.finish(`step ${response.step}`);
        updateChunks.finish(`step ${response.step}`);
        const step = { step: Number(response.step), loss: response.loss, ...current };
        current = { gradients: {}, updates: {}, messages: 0 };
        steps.push(step);
        if (onStep) onStep(step);
      } catch (error) {
        fail(error);
      }
    };
    let batchError = null;
    followStream(call, onData, (error) => {
      if (error !== null) fail(error);
      else if (current.messages !== 0) fail(new Error('Train stream ended in the middle of a step (more_in_step)'));
      else if (batchError !== null) fail(batchError);
      else finish({ steps });
    });

    const send = async () => {
      try {
        if (!call.write({ config })) await onceOr(call, 'drain', finished);
        for await (const batch of batches) {
          if (outcome !== null) return;
          if (!call.write({ batch: { feeds: tensors.encodeMap(batch) } })) await onceOr(call, 'drain', finished);
        }
      } catch (error) {
        // A batch that cannot be encoded, or a failing batch iterator: end the stream here, let
        // the server train the batches already sent, then reject with this error.
        batchError = error;
      }
      if (outcome === null) call.end();
    };
    send();
    return finished.then(() => {
      if (outcome.error) throw outcome.error;
      return outcome.steps;
    });
  }
}

module.exports = { Client, loadPackage, PROTO_DIR, LOADER_OPTIONS };
