#!/usr/bin/env python3
"""Checks what an example subscriber (examples/python, examples/node) printed in .ci/interop.

    watch_check.py OUTPUT --store ID:FIRST:LAST [--store ID:FIRST:LAST ...] [--resumes ID]

Both examples print the same lines: `connecting to T: starting with the initial state`,
`connecting to T: resuming from revision N of store S`, `change N CHANGE_TYPE_X c/k ...`,
`synced N store=S profiles=K`, `the store changed (A -> B): starting over ...`. This checks:
- per store, the CREATED/UPDATED changes printed are exactly FIRST..LAST, in order: no gap, no
  duplicate, across every reconnect;
- every resume names the revision after the last one really received (the last change or
  Synced printed for that store), and of the store it was received from;
- `--resumes ID`: the subscriber did resume within store ID (it did not start over);
- a store change is noticed (`the store changed (A -> B)`) before B's changes.
Exits 1 naming the first line that breaks a rule.
"""

import argparse
import re
import sys

CHANGE = re.compile(r"^change (\d+) (CHANGE_TYPE_\w+) ")
SYNCED = re.compile(r"^synced (\d+) store=(\S+) ")
RESUME = re.compile(r"^connecting to \S+: resuming from revision (\d+) of store (\S+)$")
INITIAL = re.compile(r"^connecting to \S+: starting with the initial state$")
STORE_CHANGED = re.compile(r"^the store changed \((\S+) -> (\S+)\)")


def check(lines, stores, resumes):
    store = None  # the store the current stream serves, once known
    last = {}  # store -> last revision received (change or synced)
    changes = {store_id: [] for store_id in stores}
    resumed = set()
    noticed = set()
    for number, line in enumerate(lines, 1):
        where = f"line {number}: {line!r}"
        if INITIAL.match(line):
            store = None
        elif match := RESUME.match(line):
            revision, store = int(match[1]), match[2]
            if store not in last:
                return f"{where}: resumes a store it never synced with"
            if revision != last[store] + 1:
                return f"{where}: the last revision received was {last[store]}"
            resumed.add(store)
        elif match := STORE_CHANGED.match(line):
            noticed.add(match[2])
            store = None
        elif match := SYNCED.match(line):
            revision, store = int(match[1]), match[2]
            if store in last and revision < last[store]:
                return f"{where}: synced below revision {last[store]} already received"
            last[store] = revision
        elif match := CHANGE.match(line):
            revision, kind = int(match[1]), match[2]
            if kind == "CHANGE_TYPE_EXISTING":
                continue
            if store is None:
                return f"{where}: a change before the stream named its store"
            if store not in changes:
                return f"{where}: a change of an unexpected store {store}"
            changes[store].append(revision)
            last[store] = revision
    for store_id, (first, final) in stores.items():
        expected = list(range(first, final + 1))
        if changes[store_id] != expected:
            return f"store {store_id}: changes {changes[store_id]}, expected {expected}"
    for store_id in resumes:
        if store_id not in resumed:
            return f"store {store_id}: never resumed"
    for store_id in list(stores)[1:]:
        if store_id not in noticed:
            return f"store {store_id}: the change to it was not noticed"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--store", action="append", required=True, metavar="ID:FIRST:LAST")
    parser.add_argument("--resumes", action="append", default=[], metavar="ID")
    args = parser.parse_args()
    stores = {}
    for spec in args.store:
        store_id, first, last = spec.rsplit(":", 2)
        stores[store_id] = (int(first), int(last))
    with open(args.output, encoding="utf-8") as output:
        lines = [line.rstrip("\n") for line in output]
    problem = check(lines, stores, args.resumes)
    if problem:
        print(f"{args.output}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
