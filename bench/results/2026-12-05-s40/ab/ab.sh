#!/bin/bash
# Session 40 before/after: the session's first build ("base", 657bc78: session 39's end plus
# the first poll-findings rule, which touches only a replica's 0.2 s status poll) against its
# end ("new"), alternated, one round each, nothing else on the box. Arguments: the pairs'
# numbers. ORDER="new base" runs each pair the other way round.
B=/work/bin/s40/bench
for pair in "$@"; do
  for build in ${ORDER:-base new}; do
    echo "== ingest $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B ingest --server-bin /work/bin/s40/$build --no-baseline --rounds 1 --duration 8s --json ingest-$build-$pair.json > ingest-$build-$pair.txt 2>&1
    grep -E 'ours:' ingest-$build-$pair.txt
    echo "== cluster $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B cluster --server-bin /work/bin/s40/$build --rounds 1 --duration 8s --json cluster-$build-$pair.json > cluster-$build-$pair.txt 2>&1
    grep -E '^cluster +ingest req/s|replication lag p99|CPU µs per webhook' cluster-$build-$pair.txt
  done
done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
