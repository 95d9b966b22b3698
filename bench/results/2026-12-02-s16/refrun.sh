#!/bin/bash
# The issue 12 reference run: every scenario, 3 rounds (memory 1), one after the other.
set -u
BIN=$1; OUT=$2
B=/work/bin/bench
mkdir -p $OUT
run() { name=$1; shift
  echo "$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg) start $name" >> $OUT/log
  $B --server-bin $BIN --json $OUT/$name.json "$@" > $OUT/$name.txt 2>&1
  echo "$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg) end $name rc=$?" >> $OUT/log
}
run ingest ingest
run get get
run batch-get batch-get
run list list
run fanout fanout
run fanout-100pc fanout --subscribers 100,1000 --streams-per-connection 100
run scale scale
run memory --rounds 1 memory
run recovery --data-dir /tmp/bench-data-1m recovery
echo done >> $OUT/log
