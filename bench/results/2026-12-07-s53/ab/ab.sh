#!/bin/bash
# Session 53 before/after, alternating which build runs first per pair, one round each.
# base: /work/bin/s53/early, 41fc80b (session 52's end) built with this session's first
# start-up-only edits (a placement refusal tried again; nothing on a measured path).
# new: the session's end. On measured paths: the webhook's id length checks (two comparisons),
# the journal writer's loop over a batch's frames (one frame below 32 MiB), the replica status
# poll's quorum judgement of each stream info, and the snapshot upload's lease (renewals every
# 2 s while it uploads; chunks published by our code instead of async-nats's put).
# Arguments: the ingest pairs' numbers, then "--", then the cluster pairs'.
B=/work/bin/s53/bench
bin() { case $1 in base) echo /work/bin/s53/early;; new) echo ${NEW:-/work/bin/s53/final};; esac; }
ingest_pairs=(); cluster_pairs=(); target=ingest
for arg in "$@"; do
  if [ "$arg" = "--" ]; then target=cluster; continue; fi
  if [ $target = ingest ]; then ingest_pairs+=("$arg"); else cluster_pairs+=("$arg"); fi
done
for pair in "${ingest_pairs[@]}"; do
  order="base new"; [ $((pair % 2)) = 0 ] && order="new base"
  for build in $order; do
    echo "== ingest $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B ingest --duration 8s --server-bin $(bin $build) --no-baseline --rounds 1 \
      --json ingest-$build-$pair.json > ingest-$build-$pair.txt 2>&1
    grep -E "^ingest +(req/s|server CPU)" ingest-$build-$pair.txt
  done
done
for pair in "${cluster_pairs[@]}"; do
  order="base new"; [ $((pair % 2)) = 0 ] && order="new base"
  for build in $order; do
    echo "== cluster $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B cluster --server-bin $(bin $build) --rounds 1 --duration 8s \
      --json cluster-$build-$pair.json > cluster-$build-$pair.txt 2>&1
    grep -E '^cluster +ingest req/s|replication lag p99|CPU µs per webhook' cluster-$build-$pair.txt
  done
done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
