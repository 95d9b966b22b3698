// Watches Gameball profile changes from profile-state, and never misses one.
//
// Watches with the initial state, keeps a local copy of every profile, prints each change, and
// after a disconnect (a server restart, a network blip) resumes from the last revision it
// really received: start_revision = that revision + 1, so no change is missed or repeated. It
// checks the store id before resuming (a wiped store has new revisions: it starts over with the
// initial state), and on Reset (the server's history no longer covers where it was) drops what
// it knew and takes the initial state that follows.
//
//   npm ci && npm run build
//   node dist/subscriber.js --target localhost:50051 --client-id 2155
//
// Stop it with Ctrl-C or SIGTERM.

import { parseArgs } from "node:util";

import * as grpc from "@grpc/grpc-js";

import {
  ChangeType,
  ChangeTypeSchema,
  ProfileService,
  TierDirectionSchema,
  type Profile,
  type ProfileChange,
  type WatchProfilesResponse,
} from "./gen/gameball/profiles/v1/profiles_pb.js";
import { connect, isServiceError, serverStream, unary, type ConnectOptions } from "./rpc.js";

/** Errors after which reconnecting can help; any other status ends the program. */
const RETRYABLE = new Set([
  grpc.status.UNAVAILABLE,
  grpc.status.DEADLINE_EXCEEDED,
  grpc.status.RESOURCE_EXHAUSTED,
]);

const USAGE = `usage: node dist/subscriber.js [options]
  --target HOST:PORT    gRPC address (default localhost:50051)
  --client-id ID        Gameball account to watch (default: all)
  --tls                 use TLS, verifying the server against the system's CAs
  --ca FILE             use TLS, verifying the server against this PEM CA
  --cert FILE --key FILE  client certificate and key (PEM), for mTLS
  --server-name NAME    name the server's certificate is checked against (default: the host)
  --token TOKEN         bearer token (default: $PROFILE_STATE_TOKEN); sent over TLS as call
                        credentials, over plaintext only with a warning`;

/** What the subscriber knows. */
interface State {
  /** Everything up to this revision was received; null: no consistent state yet. */
  lastRevision: bigint | null;
  /** The store the revisions belong to. */
  storeId: string | null;
  /** The local copy: "client_id/customer_id" -> profile. */
  profiles: Map<string, Profile>;
}

function parseOptions(): ConnectOptions & { clientId: string } {
  const { values } = parseArgs({
    options: {
      target: { type: "string", default: "localhost:50051" },
      "client-id": { type: "string", default: "" },
      tls: { type: "boolean", default: false },
      ca: { type: "string" },
      cert: { type: "string" },
      key: { type: "string" },
      "server-name": { type: "string" },
      token: { type: "string" },
      help: { type: "boolean", default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  if (Boolean(values.cert) !== Boolean(values.key)) {
    throw new Error("--cert and --key go together");
  }
  return {
    target: values.target,
    clientId: values["client-id"],
    tls: values.tls || values.ca !== undefined || values.cert !== undefined,
    ca: values.ca,
    cert: values.cert,
    key: values.key,
    serverName: values["server-name"],
    token: values.token ?? process.env.PROFILE_STATE_TOKEN,
  };
}

function describe(change: ProfileChange): string {
  const profile = change.profile;
  const kind = ChangeTypeSchema.value[change.type]?.name ?? String(change.type);
  let text = `change ${change.revision} ${kind} ${profile?.clientId}/${profile?.customerId}`;
  if (profile?.tierName !== undefined) text += ` tier=${profile.tierName}`;
  if (profile?.totalPoints !== undefined) text += ` total_points=${profile.totalPoints}`;
  if (change.tierChange) {
    text += ` tier_change=${TierDirectionSchema.value[change.tierChange.direction]?.name}`;
  }
  if (change.pointsDelta) {
    const total = change.pointsDelta.total;
    text += ` points_delta=${total >= 0n ? "+" : ""}${total}`;
  }
  return text;
}

function startOver(state: State, why: string): void {
  console.log(`${why}: starting over with the initial state`);
  state.lastRevision = null;
  state.storeId = null;
  state.profiles.clear();
}

/** Applies one event; returns false when the stream must be given up (another store). */
function apply(state: State, response: WatchProfilesResponse): boolean {
  const event = response.event;
  switch (event.case) {
    case "change": {
      const change = event.value;
      const profile = change.profile;
      if (profile) state.profiles.set(`${profile.clientId}/${profile.customerId}`, profile);
      // Existing profiles of the initial state are not changes: the resume point is Synced.
      if (change.type !== ChangeType.EXISTING) state.lastRevision = change.revision;
      console.log(describe(change));
      return true;
    }
    case "synced": {
      const synced = event.value;
      if (state.storeId !== null && synced.storeId !== state.storeId) {
        // The changes just replayed came from another store than the one we resumed.
        startOver(state, `the store changed (${state.storeId} -> ${synced.storeId})`);
        return false;
      }
      state.storeId = synced.storeId;
      state.lastRevision = synced.revision;
      console.log(
        `synced ${synced.revision} store=${synced.storeId} profiles=${state.profiles.size}`,
      );
      return true;
    }
    case "progress":
      // Only a resume point once the stream is consistent (not during an initial state).
      if (state.lastRevision !== null) state.lastRevision = event.value.revision;
      return true;
    case "reset":
      console.log(`reset: ${event.value.reason}`);
      // The full initial state follows; until its Synced there is no resume point.
      state.lastRevision = null;
      state.storeId = event.value.storeId;
      state.profiles.clear();
      return true;
    default:
      return true;
  }
}

/**
 * One WatchProfiles call, from its request to the end of its stream: "restart" when it was
 * given up for another store (reconnect at once), "ended" when the server ended it without an
 * error (reconnect after the back-off).
 */
async function watchOnce(
  client: grpc.Client,
  metadata: grpc.Metadata,
  options: ConnectOptions & { clientId: string },
  state: State,
  received: () => void,
): Promise<"restart" | "ended"> {
  if (state.lastRevision !== null) {
    const info = await unary(client, metadata, ProfileService.method.getServerInfo, {}, {
      deadline: Date.now() + 10_000,
    });
    if (info.storeId !== state.storeId) {
      startOver(state, `the store changed (${state.storeId} -> ${info.storeId})`);
    }
  }
  const from = state.lastRevision === null ? null : state.lastRevision + 1n;
  console.log(
    from === null
      ? `connecting to ${options.target}: starting with the initial state`
      : `connecting to ${options.target}: resuming from revision ${from} of store ${state.storeId}`,
  );
  // No deadline: it would cover the whole stream, not one message.
  const stream = serverStream(client, metadata, ProfileService.method.watchProfiles, {
    clientId: options.clientId,
    sendInitialState: from === null,
    startRevision: from ?? 0n,
    progressIntervalSeconds: 5,
    // Resume only within the same store: the server answers another store's revisions with Reset.
    storeId: state.storeId ?? "",
  });
  for await (const response of stream) {
    received();
    if (!apply(state, response)) return "restart"; // leaving the loop cancels the call
  }
  return "ended";
}

async function main(): Promise<number> {
  const options = parseOptions();
  const { client, metadata } = connect(options);
  const stop = () => {
    client.close();
    process.exit(0);
  };
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);

  const state: State = { lastRevision: null, storeId: null, profiles: new Map() };
  let delayMs = 100;
  for (;;) {
    try {
      const outcome = await watchOnce(client, metadata, options, state, () => (delayMs = 100));
      if (outcome === "restart") continue;
      console.log(`the server ended the stream; reconnecting in ${delayMs / 1000} s`);
    } catch (error) {
      if (!isServiceError(error)) throw error;
      const reason = `${grpc.status[error.code]}: ${error.details}`;
      if (!RETRYABLE.has(error.code)) {
        console.error(`giving up: ${reason}`);
        return 1;
      }
      console.log(`disconnected (${reason}); reconnecting in ${delayMs / 1000} s`);
    }
    await new Promise((resolve) => setTimeout(resolve, delayMs));
    delayMs = Math.min(delayMs * 2, 5000);
  }
}

main().then(
  (code) => process.exit(code),
  (error: unknown) => {
    console.error(`error: ${error instanceof Error ? error.message : String(error)}`);
    process.exit(2);
  },
);
