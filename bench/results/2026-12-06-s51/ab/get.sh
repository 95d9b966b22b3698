#!/bin/bash
# Session 51: GetProfile (one small first message per call, each now drawing what its call
# holds too and giving it back with its first chunk) against the session's start ("base",
# 72d7429) and the change ("new"), alternating which build runs first per pair; ours only.
B=/work/bin/s49/bench-ref
bin() { case $1 in base) echo /work/bin/s51/base;; new) echo ${NEW:-/work/bin/s51/calls2};; esac; }
for pair in "$@"; do
  order="base new"; [ $((pair % 2)) = 0 ] && order="new base"
  for build in $order; do
    echo "== get $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B get --duration 8s --server-bin $(bin $build) --no-baseline --rounds 1 \
      --json get-$build-$pair.json > get-$build-$pair.txt 2>&1
    grep -E "^get +(GetProfile calls|server CPU)" get-$build-$pair.txt
  done
done
