#!/bin/bash
# Session 37 before/after: the session's start (head, 41854a0's service) against its end (new,
# 1dfc5ac's; the service did not change after it), alternated, one round each, nothing else on
# the box. The session changed nothing on a single node's webhook path; on a replica's, the
# publisher's publish_as was split in three (the same code) and each snapshot upload reads one
# stream message. Arguments: the cluster pairs' numbers.
# ORDER="new head" runs each pair the other way round.
B=/work/bin/s36/bench
for pair in "$@"; do
  for build in ${ORDER:-head new}; do
    echo "== cluster $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B cluster --server-bin /work/bin/s37/$build --rounds 1 --duration 8s --json cluster-$build-$pair.json > cluster-$build-$pair.txt 2>&1
    grep -E '^cluster +ingest req/s|replication lag p99|CPU µs per webhook' cluster-$build-$pair.txt
  done
done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
