#!/bin/bash
# reference.sh: issue 12 and 13's reference run, every scenario in one go, 3 rounds each
# (memory 1), nothing else on the box. Binaries: main's release build, copied aside first.
B=${B:-/work/bin/s60/bench}; S=${S:-/work/bin/s60/final}; OUT=${OUT:-.}
run() { name=$1; shift
  echo "== $name $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  $B "$@" --server-bin $S --json $OUT/$name.json > $OUT/$name.out 2>&1
  grep -E "^(ingest|get|batch|list|fanout|scale|memory|recovery|cluster) " $OUT/$name.out | grep -v "^fanout S=[0-9]* (" 
}
run ingest ingest
run get get
run batch-get batch-get
run list list
run fanout fanout
run fanout-100pc fanout --subscribers 100,1000 --streams-per-connection 100
run scale scale
run memory memory --rounds 1
run recovery recovery --data-dir /tmp/bench-data-1m
run cluster cluster
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
