#!/bin/bash
# Session 51: the 1,000 x 100 fan-out (every chunk handed over now takes the call's part, None
# after a stream's first, and a counted chunk is larger by it), base vs new, alternated.
B=/work/bin/s49/bench-ref
bin() { case $1 in base) echo /work/bin/s51/base;; new) echo ${NEW:-/work/bin/s51/calls5};; esac; }
for pair in "$@"; do
  order="base new"; [ $((pair % 2)) = 0 ] && order="new base"
  for build in $order; do
    echo "== fanout $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B fanout --subscribers 1000 --streams-per-connection 100 --duration 8s \
      --server-bin $(bin $build) --no-baseline --rounds 1 \
      --json fanout-$build-$pair.json > fanout-$build-$pair.txt 2>&1
    grep -E "^fanout( S=[0-9]+)? +(server CPU|delivery lat)" fanout-$build-$pair.txt \
      | grep -vE "floor|alone|sent|max" | head -4
  done
done
