#!/bin/bash
# Session 46: a watch stream's messages counted in the answer budgets (every delivery takes
# its bytes from its connection's and the server's budget and gives them back as the socket
# takes them), against the session's start ("base", a25710c) and "new". Alternated, one round
# each, ours only. Arguments: the pairs' numbers; ORDER="new base" runs a pair the other way.
B=/work/bin/s46/bench
for pair in "$@"; do
  for build in ${ORDER:-base new}; do
    echo "== fanout $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B fanout --subscribers 1000 --duration 8s --server-bin /work/bin/s46/$build --no-baseline \
      --rounds 1 --json fanout-$build-$pair.json > fanout-$build-$pair.txt 2>&1
    grep -E 'ingest|p50|p99|CPU' fanout-$build-$pair.txt | head -8
    echo "== fanout100 $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B fanout --subscribers 1000 --streams-per-connection 100 --duration 8s \
      --server-bin /work/bin/s46/$build --no-baseline --rounds 1 \
      --json fanout100-$build-$pair.json > fanout100-$build-$pair.txt 2>&1
    grep -E 'p50|p99|CPU' fanout100-$build-$pair.txt | head -8
    echo "== get $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B get --duration 8s --server-bin /work/bin/s46/$build --no-baseline --rounds 1 \
      --json get-$build-$pair.json > get-$build-$pair.txt 2>&1
    grep -E 'calls|CPU' get-$build-$pair.txt | head -4
  done
done
