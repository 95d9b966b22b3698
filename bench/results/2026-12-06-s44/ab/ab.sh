#!/bin/bash
# Session 44: the webhook path's changes (the signature says which form it covered; HTTP/1.1
# reads at most 32 KiB of a request head; a body nested too deep told its key) against the
# last build of session 43 ("base", e06da19: 43c1e44 changed the gRPC answer budgets only).
# "new" is the session's build. Alternated, one round each, ours only. Arguments: the pairs'
# numbers; ORDER="new base" runs a pair the other way round.
B=/work/bin/s44/profile-state-bench
for pair in "$@"; do
  for build in ${ORDER:-base new}; do
    echo "== ingest $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B ingest --duration 8s --server-bin /work/bin/s44/$build --no-baseline --rounds 1 \
      --json ingest-$build-$pair.json > ingest-$build-$pair.txt 2>&1
    grep -E 'ours|ephemeral|durable' ingest-$build-$pair.txt | head -6
  done
done
