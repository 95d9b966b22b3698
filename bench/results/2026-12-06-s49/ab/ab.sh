#!/bin/bash
# Session 49: this session's change on a measured path (the sequencer's loop: one more select
# branch, enabled only while a snapshot waits for another to end) against session 48's end
# ("base", ae67251) and main ("new", 0f6c427). Alternated, one round each, ours only.
B=/work/bin/s49/bench-ref
bin() { case $1 in base) echo /work/bin/s49/s48end;; new) echo /work/bin/s49/final;; esac; }
for pair in "$@"; do
  for build in ${ORDER:-base new}; do
    echo "== ingest $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B ingest --duration 8s --server-bin $(bin $build) --no-baseline --rounds 1 \
      --json ingest-$build-$pair.json > ingest-$build-$pair.txt 2>&1
    grep -E '^ingest +(req/s|server CPU)' ingest-$build-$pair.txt | head -4
  done
done
