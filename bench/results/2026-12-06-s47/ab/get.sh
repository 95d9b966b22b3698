#!/bin/bash
# GetProfile alone, alternated (the first set's new build was bimodal: 47k and 60k calls/s).
B=/work/bin/s47/bench
bin() { case $1 in base) echo /work/bin/s47/head;; new) echo /work/bin/s47/fix2;; gen1) echo /work/bin/s47/gen1;; esac; }
for pair in "$@"; do
  for build in ${ORDER:-base new}; do
    $B get --duration 8s --server-bin $(bin $build) --no-baseline --rounds 1 \
      --json getonly-$build-$pair.json > getonly-$build-$pair.txt 2>&1
    echo "$build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg) $(grep -E 'GetProfile calls/s|CPU per call' getonly-$build-$pair.txt | awk '{print $(NF-4)}' | tr '\n' ' ')"
  done
done
