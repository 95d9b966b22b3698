#!/bin/bash
# Session 48: answer chunks counted until h2 lets go of them ("g1", a Bytes owner per chunk; "g3"
# adds reading judged by DATA frames, scanned in every socket write)
# against main before it ("base", 2a466a6). Alternated, one round each, ours only.
B=/work/bin/s48/bench
bin() { case $1 in base) echo /work/bin/s48/base;; g1) echo /work/bin/s48/g1;;
  g3) echo /work/bin/s48/g3;;
  g5) echo /work/bin/s48/g5;; esac; }
for pair in "$@"; do
  for build in ${ORDER:-base g3}; do
    echo "== fanout100 $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B fanout --subscribers 1000 --streams-per-connection 100 --duration 8s \
      --server-bin $(bin $build) --no-baseline --rounds 1 \
      --json fanout100-$build-$pair.json > fanout100-$build-$pair.txt 2>&1
    grep -E 'p50 \(answer|p99 \(answer|server CPU per delivery  ' fanout100-$build-$pair.txt | head -3
    echo "== get $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B get --duration 8s --server-bin $(bin $build) --no-baseline --rounds 1 \
      --json get-$build-$pair.json > get-$build-$pair.txt 2>&1
    grep -E 'calls|CPU' get-$build-$pair.txt | head -4
  done
done
