#!/bin/bash
# Session 36 before/after: the session's start (head, 2b39089's service) against its end (new,
# 41854a0's), alternated, one round each. ingest: --no-baseline (ours only, --ephemeral and
# durable); cluster: the full scenario. Arguments: the ingest pairs' numbers, then "--", then the
# cluster pairs'. Session 36 ran `ab.sh 1 2 -- 1 2` (ab.log), session 37 `ab.sh 3 4 5 -- 3 4`
# (ab2.log) with both binaries rebuilt on another machine.
B=/work/bin/s36/bench
ingest_pairs=(); cluster_pairs=(); target=ingest
for arg in "$@"; do
  if [ "$arg" = "--" ]; then target=cluster; continue; fi
  if [ $target = ingest ]; then ingest_pairs+=("$arg"); else cluster_pairs+=("$arg"); fi
done
for pair in "${ingest_pairs[@]}"; do
  for build in head new; do
    echo "== ingest $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B ingest --server-bin /work/bin/s36/$build --rounds 1 --duration 8s --no-baseline --json ingest-$build-$pair.json > ingest-$build-$pair.txt 2>&1
    grep -E '^ingest +req/s|server CPU per req' ingest-$build-$pair.txt
  done
done
for pair in "${cluster_pairs[@]}"; do
  for build in head new; do
    echo "== cluster $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B cluster --server-bin /work/bin/s36/$build --rounds 1 --duration 8s --json cluster-$build-$pair.json > cluster-$build-$pair.txt 2>&1
    grep -E '^cluster +ingest req/s|replication lag p99|CPU µs per webhook' cluster-$build-$pair.txt
  done
done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
