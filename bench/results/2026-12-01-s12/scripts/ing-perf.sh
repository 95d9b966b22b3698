#!/bin/bash
# usage: ing-perf.sh BIN OUT [service args...]: perf record of the service over 6 s of ingest (64 senders)
BIN=$1; OUT=$2; shift 2
$BIN --webhook-secret bench-secret --webhook-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:18081 --admin-listen 127.0.0.1:18082 "$@" > /tmp/ing-svc.log 2>&1 &
pid=$!
sleep 0.5
( sleep 4; perf record -F 499 --call-graph dwarf,32768 -p $pid -o $OUT -- sleep 6 2>/dev/null >/dev/null ) &
/work/bin/s11-bench ingest --webhook 127.0.0.1:18080 --grpc 127.0.0.1:18081 --rounds 1 --duration 10s --warmup 2s --no-baseline 2>&1 | grep -E "ours:"
wait %2 2>/dev/null
kill $pid; wait $pid 2>/dev/null
