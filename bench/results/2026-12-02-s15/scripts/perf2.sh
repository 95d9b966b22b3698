#!/bin/bash
# usage: perf2.sh BIN OUT [service args]: perf record 5 s of the service's ingest, after the bench's 100k preload
BIN=$1; OUT=$2; shift 2
$BIN --webhook-secret bench-secret --webhook-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:18081 --admin-listen 127.0.0.1:18082 "$@" > /tmp/p2-svc.log 2>&1 &
sp=$!; sleep 0.5
/work/bin/s11-bench ingest --webhook 127.0.0.1:18080 --grpc 127.0.0.1:18081 --rounds 1 --duration 12s --warmup 2s --no-baseline > /tmp/p2-bench.out 2>&1 &
bp=$!
count(){ curl -s 127.0.0.1:18082/metrics | awk '/^profile_state_webhooks_total/{s+=$2} END{print s+0}'; }
while [ $(count) -lt 120000 ]; do sleep 0.2; done
n0=$(count)
perf record -F 499 --call-graph dwarf,32768 -p $sp -o $OUT -- sleep 5 2>/dev/null >/dev/null
n1=$(count)
echo "webhooks in window: $((n1-n0))"
wait $bp; grep "ours:" /tmp/p2-bench.out
kill $sp; wait $sp 2>/dev/null
