#!/usr/bin/env python3
"""Watch Gameball profile changes from profile-state, and never miss one.

Generates its gRPC stubs from the repository's proto/ into a temporary directory, removed at
exit (needs `grpcio` and `grpcio-tools`). Watches with the initial state, keeps a local copy of
every profile, prints each change, and after a disconnect (a server restart, a network blip)
resumes from the last revision it really received: start_revision = that revision + 1, so no
change is missed or repeated. It checks the store id before resuming (a wiped store has new
revisions: it starts over with the initial state), and on Reset (the server's history no longer
covers where it was) drops what it knew and takes the initial state that follows.

    python3 examples/python/subscriber.py --target localhost:50051 --client-id 2155

Over TLS (--ca, or --tls for the system's CAs), with a client certificate for mTLS and a
bearer token from $PROFILE_STATE_TOKEN:

    PROFILE_STATE_TOKEN=... python3 examples/python/subscriber.py \\
        --target profile-state:50051 --ca ca.pem --cert client.pem --key client-key.pem

Stop it with Ctrl-C or SIGTERM.
"""

import argparse
import importlib
import os
import pathlib
import signal
import sys
import tempfile
import time

import grpc
from grpc_tools import protoc

PROTO_DIR = pathlib.Path(__file__).resolve().parents[2] / "proto"
# Errors after which reconnecting can help; any other status ends the program.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def load_stubs(proto_dir: pathlib.Path, out: pathlib.Path):
    """Compiles proto_dir's profiles.proto into `out` and imports the modules."""
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


def read(path):
    return pathlib.Path(path).read_bytes() if path else None


def open_channel(args):
    """A channel to args.target: plaintext, or TLS (with a client certificate for mTLS), and
    the metadata each call carries."""
    if not args.tls:
        if args.token:
            # Call credentials need TLS; the token goes as plain metadata instead, readable by
            # anyone on the path.
            print("warning: sending the bearer token without TLS", file=sys.stderr)
            return grpc.insecure_channel(args.target), [("authorization", f"Bearer {args.token}")]
        return grpc.insecure_channel(args.target), None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca),
        private_key=read(args.key),
        certificate_chain=read(args.cert),
    )
    if args.token:
        # Sends `authorization: Bearer <token>` on every call, and only over TLS.
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(args.token)
        )
    options = []
    if args.server_name:
        options = [
            ("grpc.ssl_target_name_override", args.server_name),
            ("grpc.default_authority", args.server_name),
        ]
    return grpc.secure_channel(args.target, credentials, options), None


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


class Subscriber:
    """What the subscriber knows, and how each event changes it."""

    def __init__(self, pb):
        self.pb = pb
        # Everything up to this revision was received; None: no consistent state yet.
        self.last_revision = None
        # The store the revisions belong to.
        self.store_id = None
        # The local copy: (client_id, customer_id) -> profile.
        self.profiles = {}

    def start_over(self, why):
        print(f"{why}: starting over with the initial state", flush=True)
        self.last_revision = None
        self.store_id = None
        self.profiles.clear()

    def apply(self, response) -> bool:
        """Applies one event; False when the stream must be given up (another store)."""
        event = response.WhichOneof("event")
        if event == "change":
            change = response.change
            key = (change.profile.client_id, change.profile.customer_id)
            self.profiles[key] = change.profile
            # Existing profiles of the initial state are not changes: the resume point is Synced.
            if change.type != self.pb.CHANGE_TYPE_EXISTING:
                self.last_revision = change.revision
            print(describe(change, self.pb), flush=True)
        elif event == "synced":
            synced = response.synced
            if self.store_id is not None and synced.store_id != self.store_id:
                # The changes just replayed came from another store than the one we resumed.
                self.start_over(f"the store changed ({self.store_id} -> {synced.store_id})")
                return False
            self.store_id = synced.store_id
            self.last_revision = synced.revision
            print(
                f"synced {synced.revision} store={synced.store_id} profiles={len(self.profiles)}",
                flush=True,
            )
        elif event == "progress":
            # Only a resume point once the stream is consistent (not during an initial state).
            if self.last_revision is not None:
                self.last_revision = response.progress.revision
        elif event == "reset":
            print(f"reset: {response.reset.reason}", flush=True)
            # The full initial state follows; until its Synced there is no resume point.
            self.last_revision = None
            self.store_id = response.reset.store_id
            self.profiles.clear()
        return True

    def watch_once(self, stub, args, metadata, received) -> str:
        """One WatchProfiles call, from its request to the end of its stream: "restart" when
        it was given up for another store (reconnect at once), "ended" when the server ended
        it without an error (reconnect after the back-off)."""
        pb = self.pb
        if self.last_revision is not None:
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=metadata, timeout=10)
            if info.store_id != self.store_id:
                self.start_over(f"the store changed ({self.store_id} -> {info.store_id})")
        start = None if self.last_revision is None else self.last_revision + 1
        if start is None:
            print(f"connecting to {args.target}: starting with the initial state", flush=True)
        else:
            print(
                f"connecting to {args.target}: resuming from revision {start} "
                f"of store {self.store_id}",
                flush=True,
            )
        request = pb.WatchProfilesRequest(
            client_id=args.client_id,
            send_initial_state=start is None,
            start_revision=start or 0,
            progress_interval_seconds=5,
            # Resume only within the same store: the server answers another store's revisions
            # with Reset.
            store_id=self.store_id or "",
        )
        # No deadline: it would cover the whole stream, not one message.
        stream = stub.WatchProfiles(request, metadata=metadata)
        for response in stream:
            received()
            if not self.apply(response):
                stream.cancel()
                return "restart"
        return "ended"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target", default="localhost:50051", help="gRPC address (default: %(default)s)"
    )
    parser.add_argument(
        "--client-id", default="", help="Gameball account to watch (default: all)"
    )
    parser.add_argument(
        "--tls", action="store_true", help="use TLS, verifying the server against system CAs"
    )
    parser.add_argument("--ca", help="use TLS, verifying the server against this PEM CA")
    parser.add_argument("--cert", help="client certificate (PEM), for mTLS; needs --key")
    parser.add_argument("--key", help="client private key (PEM), for mTLS; needs --cert")
    parser.add_argument("--server-name", help="name the server's certificate is checked against")
    parser.add_argument(
        "--token",
        default=os.environ.get("PROFILE_STATE_TOKEN"),
        help="bearer token (default: $PROFILE_STATE_TOKEN); sent over TLS as call credentials, "
        "over plaintext only with a warning",
    )
    # Node's stubs are built from proto/ by `npm run build`: it has no such option.
    parser.add_argument(
        "--proto-dir",
        type=pathlib.Path,
        default=PROTO_DIR,
        help="directory of the .proto files the stubs are generated from at start "
        "(default: this repository's proto/)",
    )
    args = parser.parse_args()
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    args.tls = args.tls or bool(args.ca or args.cert)
    return args


def run(args, stubs_dir: pathlib.Path) -> int:
    pb, services = load_stubs(args.proto_dir, stubs_dir)
    channel, metadata = open_channel(args)
    stub = services.ProfileServiceStub(channel)
    subscriber = Subscriber(pb)
    delay = 0.1

    def received():
        nonlocal delay
        delay = 0.1

    with channel:
        while True:
            try:
                if subscriber.watch_once(stub, args, metadata, received) == "restart":
                    continue
                print(f"the server ended the stream; reconnecting in {delay:g} s", flush=True)
            except grpc.RpcError as error:
                reason = f"{error.code().name}: {error.details()}"
                if error.code() not in RETRYABLE:
                    print(f"giving up: {reason}", file=sys.stderr)
                    return 1
                print(f"disconnected ({reason}); reconnecting in {delay:g} s", flush=True)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def stop(_signum, _frame):
    """SIGINT and SIGTERM: the first stops the subscriber (as KeyboardInterrupt, so the stubs
    directory is removed); later ones, a second Ctrl-C or `timeout` signalling its process
    group as well, are ignored rather than break off that cleanup."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    with tempfile.TemporaryDirectory(prefix="profile-state-stubs-") as stubs_dir:
        try:
            return run(args, pathlib.Path(stubs_dir))
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
