#!/usr/bin/env python3
"""Watch Gameball profile changes from profile-state, and never miss one.

Generates its gRPC stubs from the repository's proto/ at start (needs `grpcio` and
`grpcio-tools`), watches with the initial state, prints each change, and after a disconnect
(server restart, network blip) reconnects with `start_revision = last revision seen + 1`, so no
change is missed or repeated. On `Reset` (the server's history no longer covers where we were)
it drops what it knew and takes the initial state that follows.

    python3 examples/python/subscriber.py --target localhost:50051 --client-id 2155
"""

import argparse
import importlib
import pathlib
import sys
import tempfile
import time

import grpc
from grpc_tools import protoc

PROTO_DIR = pathlib.Path(__file__).resolve().parents[2] / "proto"
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def load_stubs(proto_dir: pathlib.Path):
    """Compiles proto_dir's profiles.proto into a temp dir and imports the modules."""
    out = pathlib.Path(tempfile.mkdtemp(prefix="profile-state-stubs-"))
    proto = "gameball/profiles/v1/profiles.proto"
    # protoc's own include dir provides google/protobuf/*.proto.
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        [
            "protoc",
            f"-I{proto_dir}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            proto,
        ]
    )
    if status != 0:
        sys.exit(f"generating stubs from {proto_dir} failed (protoc exit {status})")
    sys.path.insert(0, str(out))
    messages = importlib.import_module("gameball.profiles.v1.profiles_pb2")
    services = importlib.import_module("gameball.profiles.v1.profiles_pb2_grpc")
    return messages, services


def describe(change, pb) -> str:
    profile = change.profile
    kind = pb.ChangeType.Name(change.type)
    text = f"change {change.revision} {kind} {profile.client_id}/{profile.customer_id}"
    if profile.HasField("tier_name"):
        text += f" tier={profile.tier_name}"
    if profile.HasField("total_points"):
        text += f" total_points={profile.total_points}"
    if change.HasField("tier_change"):
        text += f" tier_change={pb.TierDirection.Name(change.tier_change.direction)}"
    if change.HasField("points_delta"):
        text += f" points_delta={change.points_delta.total:+d}"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:50051", help="gRPC address")
    parser.add_argument("--client-id", default="", help="Gameball account; empty = all")
    parser.add_argument("--token", help="bearer token, if the server requires one")
    parser.add_argument("--proto-dir", type=pathlib.Path, default=PROTO_DIR)
    parser.add_argument(
        "--until-revision",
        type=int,
        default=0,
        help="exit once this revision was seen (0 = run until interrupted)",
    )
    args = parser.parse_args()
    pb, services = load_stubs(args.proto_dir)
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else None

    last_revision = 0  # everything up to here was seen; resume after it
    store_id = None
    profiles = {}  # our local view: customer id -> profile
    delay = 0.1
    while True:
        request = pb.WatchProfilesRequest(
            client_id=args.client_id,
            send_initial_state=last_revision == 0,
            start_revision=last_revision + 1 if last_revision else 0,
            progress_interval_seconds=5,
            # Resume only within the same store: another store id means Reset and a new start.
            store_id=store_id or "",
        )
        try:
            with grpc.insecure_channel(args.target) as channel:
                stub = services.ProfileServiceStub(channel)
                # No deadline: it would cover the whole stream, not one message.
                for response in stub.WatchProfiles(request, metadata=metadata):
                    delay = 0.1
                    event = response.WhichOneof("event")
                    if event == "change":
                        change = response.change
                        profiles[change.profile.customer_id] = change.profile
                        if change.type != pb.CHANGE_TYPE_EXISTING:
                            last_revision = change.revision
                        print(describe(change, pb), flush=True)
                    elif event == "synced":
                        if store_id is not None and response.synced.store_id != store_id:
                            print("the store changed: starting over", flush=True)
                            profiles.clear()
                        store_id = response.synced.store_id
                        last_revision = response.synced.revision
                        print(f"synced {last_revision} profiles={len(profiles)}", flush=True)
                    elif event == "progress":
                        last_revision = response.progress.revision
                    elif event == "reset":
                        print(f"reset: {response.reset.reason}", flush=True)
                        profiles.clear()
                        store_id = response.reset.store_id
                    if args.until_revision and last_revision >= args.until_revision:
                        return 0
        except grpc.RpcError as error:
            if error.code() not in RETRYABLE:
                print(f"giving up: {error.code().name}: {error.details()}", file=sys.stderr)
                return 1
            print(
                f"disconnected ({error.code().name}: {error.details()}); "
                f"resuming from revision {last_revision + 1}",
                flush=True,
            )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
