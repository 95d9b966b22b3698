#!/bin/bash
# Session 52: webhook ingest (--ephemeral and durable, ours only) against the session's start
# ("base", 4ba0d78 + test-only commits) and the change ("new"), alternating which build runs
# first per pair. The change on the ingest path: each request's body wrapped to tell its
# connection when it is whole (two atomics, a counter), a batch frame's size checked per record.
B=/work/bin/s51/bench
bin() { case $1 in base) echo /work/bin/s52/head;; new) echo ${NEW:-/work/bin/s52/final};; esac; }
for pair in "$@"; do
  order="base new"; [ $((pair % 2)) = 0 ] && order="new base"
  for build in $order; do
    echo "== ingest $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B ingest --duration 8s --server-bin $(bin $build) --no-baseline --rounds 1 \
      --json ingest-$build-$pair.json > ingest-$build-$pair.txt 2>&1
    grep -E "^ingest +(req/s|server CPU)" ingest-$build-$pair.txt
  done
done
