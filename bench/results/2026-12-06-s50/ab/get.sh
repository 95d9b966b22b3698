#!/bin/bash
# GetProfile alone, more pairs (the box jumps between two modes): alternating which build runs
# first per pair. Same binaries as ab.sh.
B=/work/bin/s49/bench-ref
bin() { case $1 in base) echo /work/bin/s50/base;; new) echo /work/bin/s50/final;; esac; }
for pair in "$@"; do
  order="base new"; [ $((pair % 2)) = 0 ] && order="new base"
  for build in $order; do
    echo "== get $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B get --duration 8s --server-bin $(bin $build) --no-baseline --rounds 1 \
      --json getx-$build-$pair.json > getx-$build-$pair.txt 2>&1
    grep -E "^get +(GetProfile calls|server CPU)" getx-$build-$pair.txt
  done
done
