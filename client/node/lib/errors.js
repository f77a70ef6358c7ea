'use strict';
// Failed calls as one error type, with the server's google.rpc rich error details decoded.
//
// The server aborts with a google.rpc.Status carried in the `grpc-status-details-bin` trailer:
// its details hold a google.rpc.ErrorInfo (reason such as GRAPH_NOT_FOUND or SHAPE_MISMATCH,
// domain "chainrule", metadata {subject}) and, for INVALID_ARGUMENT with a culprit, a
// google.rpc.BadRequest with one field violation.

const grpc = require('@grpc/grpc-js');
const protobuf = require('protobufjs');

// Just the fields of google/rpc/status.proto, google/protobuf/any.proto and
// google/rpc/error_details.proto this client reads.
const root = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: 'string', id: 1 },
                domain: { type: 'string', id: 2 },
                metadata: { keyType: 'string', type: 'string', id: 3 },
              },
            },
            BadRequest: {
              fields: { field_violations: { rule: 'repeated', type: 'FieldViolation', id: 1 } },
              nested: {
                FieldViolation: {
                  fields: { field: { type: 'string', id: 1 }, description: { type: 'string', id: 2 } },
                },
              },
            },
          },
        },
      },
    },
  },
});
const Status = root.lookupType('google.rpc.Status');
const ErrorInfo = root.lookupType('google.rpc.ErrorInfo');
const BadRequest = root.lookupType('google.rpc.BadRequest');
const OBJECT = { longs: String, enums: String, defaults: true, keepCase: true };

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/**
 * The rich details of a grpc-js error: {status, errorInfo, violations}, from the
 * `grpc-status-details-bin` trailer, or null when the trailer is absent or unreadable.
 */
function statusDetails(error) {
  const values = error && error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (!values || values.length === 0) return null;
  try {
    const status = Status.toObject(Status.decode(values[0]), OBJECT);
    let errorInfo = null;
    const violations = [];
    for (const any of status.details) {
      const type = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
      if (type === 'google.rpc.ErrorInfo') {
        errorInfo = ErrorInfo.toObject(ErrorInfo.decode(any.value), OBJECT);
      } else if (type === 'google.rpc.BadRequest') {
        violations.push(...BadRequest.toObject(BadRequest.decode(any.value), OBJECT).field_violations);
      }
    }
    return { status, errorInfo, violations };
  } catch {
    return null;
  }
}

class ChainruleError extends Error {
  /**
   * code: the numeric gRPC status code (5 = NOT_FOUND, 3 = INVALID_ARGUMENT...);
   * codeName: its name; details: the status message; reason, domain, metadata: the ErrorInfo;
   * violations: [{field, description}] from BadRequest; cause: the grpc-js error.
   */
  constructor(grpcError) {
    const codeName = CODE_NAMES[grpcError.code] || String(grpcError.code);
    super(`${codeName}: ${grpcError.details}`, { cause: grpcError });
    this.name = 'ChainruleError';
    this.code = grpcError.code;
    this.codeName = codeName;
    this.details = grpcError.details;
    this.metadata = {};
    this.reason = null;
    this.domain = null;
    this.violations = [];
    const rich = statusDetails(grpcError);
    if (rich !== null) {
      if (rich.errorInfo !== null) {
        this.reason = rich.errorInfo.reason || null;
        this.domain = rich.errorInfo.domain || null;
        this.metadata = { ...rich.errorInfo.metadata };
      }
      this.violations = rich.violations.map(({ field, description }) => ({ field, description }));
    }
  }
}

/** A ChainruleError for grpc-js call errors (they carry a numeric `code`); anything else unchanged. */
function wrapError(error) {
  if (error instanceof ChainruleError) return error;
  if (error && typeof error.code === 'number' && 'details' in error) return new ChainruleError(error);
  return error;
}

module.exports = { ChainruleError, wrapError, statusDetails, CODE_NAMES };
