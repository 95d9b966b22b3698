#!/bin/bash
# usage: cg-get.sh BIN OUT: callgrind instructions per GetProfile call over a 10 s window of one
# `get` run (instrumentation switched on once the preload is done and calls are flowing).
# Signatures unchecked: under valgrind the SHA-1 of an occasional body came out wrong (401).
BIN=$1; OUT=$2
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$OUT $BIN --ephemeral \
  --webhook-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:18081 \
  --admin-listen 127.0.0.1:18082 --insecure-skip-signature > /tmp/cg-svc.log 2>&1 &
pid=$!
count(){ curl -s 127.0.0.1:18082/metrics | awk '/^grpc_server_handled_total.*grpc_method="GetProfile"/{s+=$2} END{print s+0}'; }
for i in $(seq 1 240); do curl -s 127.0.0.1:18082/metrics >/dev/null && break; sleep 0.5; done
/work/bin/s49/bench-ref get --webhook 127.0.0.1:18080 --grpc 127.0.0.1:18081 --rounds 1 \
  --duration 60s --warmup 1s --no-baseline --customers 2000 > /tmp/cg-bench.log 2>&1 &
bp=$!
for i in $(seq 1 600); do [ $(count) -ge 2000 ] && break; sleep 0.5; done
n0=$(count)
callgrind_control -i on $pid >/dev/null
sleep 10
callgrind_control -i off $pid >/dev/null
n1=$(count)
kill $bp 2>/dev/null; wait $bp 2>/dev/null
kill $pid; wait $pid 2>/dev/null
total=$(callgrind_annotate $OUT 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')
echo "calls in window: $((n1-n0)); instructions $total; per call $((total/(n1-n0)))"
