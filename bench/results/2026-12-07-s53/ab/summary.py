#!/usr/bin/env python3
"""Medians of ab.log's pairs: ingest (--ephemeral and durable req/s, server CPU µs per request)
and cluster (replicas req/s, their ratio to the single node in the same run, lag p99)."""
import re, statistics, sys
log = ('\n' + open(sys.argv[1] if len(sys.argv) > 1 else 'ab.log').read()).split('\n== ')
rows = {}
for block in log[1:]:
    head = block.split('\n', 1)[0].split()
    kind, build, pair = head[0], head[1], head[2]
    def num(pattern):
        m = re.search(pattern, block, re.M)
        return float(m.group(1)) if m else None
    if kind == 'ingest':
        vals = dict(eph=num(r'^ingest +req/s \(--ephemeral\) +req/s +(\d+)'),
                    dur=num(r'^ingest +req/s durable vs --ephemeral +req/s +(\d+)'),
                    cpu_eph=num(r'^ingest +server CPU per req \(--ephemeral\) +µs +([\d.]+)'),
                    cpu_dur=num(r'^ingest +server CPU per req durable +µs +([\d.]+)'))
    elif kind == 'cluster':
        vals = dict(req=num(r'^cluster +ingest req/s through 3 replicas .*?req/s +(\d+)'),
                    ratio=num(r'^cluster +ingest req/s through 3 replicas .*single node durable +([\d.]+)'),
                    lag=num(r'^cluster +replication lag p99 .*?ms +([\d.]+)'))
    else:
        continue
    rows.setdefault(kind, {}).setdefault(build, []).append((pair, vals))
for kind, builds in rows.items():
    for build, pairs in sorted(builds.items()):
        keys = pairs[0][1].keys()
        med = {k: statistics.median([v[k] for _, v in pairs if v[k] is not None]) for k in keys}
        each = '; '.join(f"{p}: " + ', '.join(f"{v[k]:g}" for k in keys if v[k] is not None) for p, v in pairs)
        print(f"{kind} {build}: medians " + ', '.join(f"{k} {med[k]:g}" for k in keys) + f"  ({each})")
