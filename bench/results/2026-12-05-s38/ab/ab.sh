#!/bin/bash
# Session 38 before/after on the cluster: the session's start (head, 841f2c8's service, the
# same as session 37's end) against its end (new), alternated, one round each, nothing else on
# the box. The session changed nothing on a single node's paths; on a replica's, each status
# poll (every 0.2 s) compares the stream's incarnation and metadata record, each published batch
# reads whether the stream is missing (a mutex), and the idle applier looks whether a failed
# publication is due again once a second. Arguments: the pairs' numbers.
# ORDER="new head" runs each pair the other way round.
B=/work/bin/s36/bench
for pair in "$@"; do
  for build in ${ORDER:-head new}; do
    echo "== cluster $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B cluster --server-bin /work/bin/s38/$build --rounds 1 --duration 8s --json cluster-$build-$pair.json > cluster-$build-$pair.txt 2>&1
    grep -E '^cluster +ingest req/s|replication lag p99|CPU µs per webhook' cluster-$build-$pair.txt
  done
done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
