#!/bin/bash
# usage: cg.sh BIN OUT [args]: callgrind instructions per webhook over a 12 s window of one ingest run
# (concurrency 32, 2000 customers; instrumentation on once the preload is done)
BIN=$1; OUT=$2; shift 2
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$OUT $BIN --webhook-secret bench-secret --webhook-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:18081 --admin-listen 127.0.0.1:18082 "$@" > /tmp/cg-svc.log 2>&1 &
pid=$!
count(){ curl -s 127.0.0.1:18082/metrics | awk '/^profile_state_webhooks_total/{s+=$2} END{print s+0}'; }
for i in $(seq 1 120); do curl -s 127.0.0.1:18082/metrics >/dev/null && break; sleep 0.5; done
/work/bin/s10-bench ingest --webhook 127.0.0.1:18080 --grpc 127.0.0.1:18081 --rounds 1 --duration 40s --warmup 1s --no-baseline --concurrency 32 --customers 2000 >/dev/null 2>&1 &
bp=$!
while [ $(count) -lt 3000 ]; do sleep 0.5; done
n0=$(count)
callgrind_control -i on $pid >/dev/null
sleep 12
callgrind_control -i off $pid >/dev/null
n1=$(count)
kill $bp 2>/dev/null; wait $bp 2>/dev/null
curl -s 127.0.0.1:18082/metrics | grep -E '^profile_state_webhooks_total'
kill $pid; wait $pid 2>/dev/null
echo "webhooks in window: $((n1-n0))"
