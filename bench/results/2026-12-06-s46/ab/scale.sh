#!/bin/bash
# Session 46: RSS per idle watch stream (every stream's body now wrapped to count its later
# messages) and the unfiltered p99, base against new3. Memory is what this compares; an
# adversarial helper was loading the box meanwhile, so the latency is not comparable.
B=/work/bin/s46/bench
for build in base new3; do
  echo "== scale $build $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  $B scale --server-bin /work/bin/s46/$build --rounds 1 --json scale-$build.json > scale-$build.txt 2>&1
  grep -E 'RSS|p99' scale-$build.txt | head -4
done
