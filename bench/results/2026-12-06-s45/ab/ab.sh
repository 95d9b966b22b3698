#!/bin/bash
# Session 45: this session's changes on measured paths, against the session's start ("base",
# a9bd91b) and "new" (029b18d): a stat of LOCK before each journal append (durable ingest),
# each customer id's feeds in a map keyed by mailbox instead of a list (routing, the
# 1,000-subscriber row), GetProfile's size checked against the message limit. Alternated, one
# round each, ours only. Arguments: the pairs' numbers; ORDER="new base" runs a pair the other
# way round.
B=/work/bin/s45ab/profile-state-bench
for pair in "$@"; do
  for build in ${ORDER:-base new}; do
    echo "== ingest $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B ingest --duration 8s --server-bin /work/bin/s45ab/$build --no-baseline --rounds 1 \
      --json ingest-$build-$pair.json > ingest-$build-$pair.txt 2>&1
    grep -E 'ours|ephemeral|durable' ingest-$build-$pair.txt | head -6
    echo "== fanout $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B fanout --subscribers 1000 --duration 8s --server-bin /work/bin/s45ab/$build --no-baseline \
      --rounds 1 --json fanout-$build-$pair.json > fanout-$build-$pair.txt 2>&1
    grep -E 'ingest|p50|p99|CPU' fanout-$build-$pair.txt | head -8
    echo "== get $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B get --duration 8s --server-bin /work/bin/s45ab/$build --no-baseline --rounds 1 \
      --json get-$build-$pair.json > get-$build-$pair.txt 2>&1
    grep -E 'calls|CPU' get-$build-$pair.txt | head -4
  done
done
