// Calls a gRPC method with @grpc/grpc-js, typed by the descriptors protoc-gen-es generated
// (`buf generate`): the generated schemas encode and decode the messages, grpc-js carries them.
// Also builds the channel credentials (TLS, mTLS, bearer token) from the command-line options.

import { readFileSync } from "node:fs";

import {
  create,
  fromBinary,
  toBinary,
  type DescMessage,
  type DescMethod,
  type DescMethodServerStreaming,
  type DescMethodUnary,
  type MessageInitShape,
  type MessageShape,
} from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";

/** How to reach and authenticate to the server. */
export interface ConnectOptions {
  /** host:port of the gRPC listener. */
  target: string;
  /** Use TLS (also implied by `ca`, `cert` and `key`). */
  tls: boolean;
  /** PEM file of the CA that signed the server's certificate; default: the system's roots. */
  ca?: string;
  /** PEM client certificate chain and key, for a server that requires mTLS. */
  cert?: string;
  key?: string;
  /** Name to verify the server's certificate against, when it differs from the target host. */
  serverName?: string;
  /** Bearer token for a server started with --grpc-auth-tokens-file. */
  token?: string;
}

/** A grpc-js client for `options`, and the metadata every call must carry. */
export function connect(options: ConnectOptions): { client: grpc.Client; metadata: grpc.Metadata } {
  const metadata = new grpc.Metadata();
  const channelOptions: grpc.ChannelOptions = {};
  let credentials: grpc.ChannelCredentials;
  if (options.tls) {
    credentials = grpc.credentials.createSsl(
      options.ca ? readFileSync(options.ca) : null,
      options.key ? readFileSync(options.key) : null,
      options.cert ? readFileSync(options.cert) : null,
    );
    if (options.serverName) {
      channelOptions["grpc.ssl_target_name_override"] = options.serverName;
      channelOptions["grpc.default_authority"] = options.serverName;
    }
    if (options.token) {
      // Call credentials: grpc-js sends them only over TLS.
      credentials = grpc.credentials.combineChannelCredentials(
        credentials,
        grpc.credentials.createFromMetadataGenerator((_params, callback) => {
          const token = new grpc.Metadata();
          token.set("authorization", `Bearer ${options.token}`);
          callback(null, token);
        }),
      );
    }
  } else {
    credentials = grpc.credentials.createInsecure();
    if (options.token) {
      // grpc-js refuses call credentials on a plaintext channel; the token goes as plain
      // metadata instead, readable by anyone on the path.
      console.error("warning: sending the bearer token without TLS");
      metadata.set("authorization", `Bearer ${options.token}`);
    }
  }
  return { client: new grpc.Client(options.target, credentials, channelOptions), metadata };
}

function path(method: DescMethod): string {
  return `/${method.parent.typeName}/${method.name}`;
}

function codec<I extends DescMessage, O extends DescMessage>(method: {
  input: I;
  output: O;
}): [(message: MessageShape<I>) => Buffer, (bytes: Buffer) => MessageShape<O>] {
  return [
    (message) => Buffer.from(toBinary(method.input, message)),
    (bytes) => fromBinary(method.output, bytes),
  ];
}

/** Calls a unary method; rejects with a grpc.ServiceError. */
export function unary<I extends DescMessage, O extends DescMessage>(
  client: grpc.Client,
  metadata: grpc.Metadata,
  method: DescMethodUnary<I, O>,
  request: MessageInitShape<I>,
  options: grpc.CallOptions = {},
): Promise<MessageShape<O>> {
  const [serialize, deserialize] = codec(method);
  return new Promise((resolve, reject) => {
    client.makeUnaryRequest(
      path(method),
      serialize,
      deserialize,
      create(method.input, request),
      metadata,
      options,
      (error, response) => (error || response === undefined ? reject(error) : resolve(response)),
    );
  });
}

/**
 * Calls a server-streaming method. The stream is async-iterable; iterating throws a
 * grpc.ServiceError when the call ends with an error, and leaving the loop cancels the call.
 */
export function serverStream<I extends DescMessage, O extends DescMessage>(
  client: grpc.Client,
  metadata: grpc.Metadata,
  method: DescMethodServerStreaming<I, O>,
  request: MessageInitShape<I>,
  options: grpc.CallOptions = {},
): grpc.ClientReadableStream<MessageShape<O>> {
  const [serialize, deserialize] = codec(method);
  return client.makeServerStreamRequest(
    path(method),
    serialize,
    deserialize,
    create(method.input, request),
    metadata,
    options,
  );
}

/** Whether `error` is a gRPC status (as opposed to a bug in this program). */
export function isServiceError(error: unknown): error is grpc.ServiceError {
  return error instanceof Error && typeof (error as Partial<grpc.ServiceError>).code === "number";
}
