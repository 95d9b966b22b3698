#!/bin/bash
# Session 49: fan-out to 1,000 subscribers, a connection each: session 39's reference build
# ("s39", 192221e) against main ("now": 48f2f38 in pairs 1-9, 0f6c427 in pairs 10-19, the
# same fan-out path), alternated, one round each, ours only: the reference run's p99 there was
# 26.9 ms against session 39's 19.0. Pairs 3-9 add other builds (s48: ae67251; s45b, s46b,
# s48b: the starts of sessions 45, 46, 48).
B=/work/bin/s49/bench-ref
bin() { case $1 in s39) echo /work/bin/s49/s39ref;; now) echo /work/bin/s49/final;;
  s48) echo /work/bin/s49/s48end;; s45b) echo /work/bin/s45ab/base;;
  s46b) echo /work/bin/s46/base;; s48b) echo /work/bin/s48/base;; esac; }
for pair in "$@"; do
  for build in ${ORDER:-s39 now}; do
    echo "== each $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B fanout --subscribers 1000 --duration 8s \
      --server-bin $(bin $build) --no-baseline --rounds 1 \
      --json each-$build-$pair.json > each-$build-$pair.txt 2>&1
    grep -E 'p50 \(answer|p99 \(answer|server CPU per delivery  |ingest req/s with' each-$build-$pair.txt | head -4
  done
done
