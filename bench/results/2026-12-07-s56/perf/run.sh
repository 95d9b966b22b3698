#!/bin/bash
# run.sh BIN TAG: perf record the --ephemeral server during an ingest round (ours only)
BIN=$1; TAG=$2
W=127.0.0.1:18080; G=127.0.0.1:18081; A=127.0.0.1:18082
$BIN --ephemeral --webhook-secret bench-secret --webhook-listen $W --grpc-listen $G --admin-listen $A > server-$TAG.log 2>&1 &
SP=$!
for i in $(seq 100); do curl -s -o /dev/null http://$A/readyz && break; sleep 0.1; done
(sleep 6; perf record -F 499 --call-graph dwarf,32768 -p $SP -o perf-$TAG.data -- sleep 8 > /dev/null 2>&1) &
/work/main/target/release/profile-state-bench ingest --webhook $W --grpc $G --no-baseline --rounds 1 --duration 12s 2>&1 | grep -E "req/s|CPU per req" | head -4
wait %2 2>/dev/null
kill $SP; wait $SP
