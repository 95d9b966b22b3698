#!/bin/bash
# The 1,000-subscriber ingest row (a connection each), two more alternated pairs.
B=/work/bin/s47/bench
bin() { case $1 in base) echo /work/bin/s47/head;; new) echo /work/bin/s47/fix2;; esac; }
for pair in "$@"; do
  for build in ${ORDER:-new base}; do
    $B fanout --subscribers 1000 --duration 8s --server-bin $(bin $build) --no-baseline \
      --rounds 1 --json fanout-$build-$pair.json > fanout-$build-$pair.txt 2>&1
    echo "$build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg) $(grep -E 'ingest req/s with|p99 \(answer' fanout-$build-$pair.txt | awk '{print $(NF-6), $(NF-5), $(NF-3)}' | tr '\n' ' ')"
  done
done
