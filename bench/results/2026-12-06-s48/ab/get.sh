#!/bin/bash
# Session 48: GetProfile only, the session's final build ("g5") against its start ("base"),
# alternated pair by pair (odd pairs base first), one round of 8 s each, ours only.
B=/work/bin/s48/bench
bin() { case $1 in base) echo /work/bin/s48/base;; g5) echo /work/bin/s48/g5;; esac; }
for pair in "$@"; do
  order="base g5"; [ $((pair % 2)) -eq 0 ] && order="g5 base"
  for build in $order; do
    echo "== get $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B get --duration 8s --server-bin $(bin $build) --no-baseline --rounds 1 \
      --json get-$build-$pair.json > get-$build-$pair.txt 2>&1
    grep -E 'calls/s  |CPU per call' get-$build-$pair.txt | head -2
  done
done
