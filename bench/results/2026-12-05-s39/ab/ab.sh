#!/bin/bash
# Session 39 before/after on the cluster: the reference run's build (192221e, "ref") against
# the same with the publish raced against the stream's status ("race": one `select!` and, while
# a publish waits, a status read every 0.2 s), alternated, one round each, nothing else on the
# box. Arguments: the pairs' numbers. ORDER="race ref" runs each pair the other way round.
B=/work/bin/s39/bench-ref
for pair in "$@"; do
  for build in ${ORDER:-ref ${BUILD2:-race}}; do
    echo "== cluster $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B cluster --server-bin /work/bin/s39/$build --rounds 1 --duration 8s --json cluster-$build-$pair.json > cluster-$build-$pair.txt 2>&1
    grep -E '^cluster +ingest req/s|replication lag p99|CPU µs per webhook' cluster-$build-$pair.txt
  done
done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
