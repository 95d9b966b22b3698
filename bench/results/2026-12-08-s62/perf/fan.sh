#!/bin/bash
# perf record ours during fanout 100x100's latency part
BIN=$1; TAG=$2
W=127.0.0.1:18080; G=127.0.0.1:18081; A=127.0.0.1:18082
$BIN --ephemeral --webhook-secret bench-secret --webhook-listen $W --grpc-listen $G --admin-listen $A > server-$TAG.log 2>&1 &
SP=$!
for i in $(seq 100); do curl -s -o /dev/null http://$A/readyz && break; sleep 0.1; done
/work/bin/s62/bench fanout --webhook $W --grpc $G --subscribers 100 --streams-per-connection 100 --no-baseline --rounds 1 --duration 10s > fan-$TAG.out 2>&1 &
BP=$!
# wait for the first deliveries: the server's CPU climbs
sleep 5
perf record -F 1999 --call-graph dwarf,16384 -p $SP -o perf-fan-$TAG.data -- sleep 7 > /dev/null 2>&1
wait $BP
kill $SP; wait $SP
grep -E "S=100 \(ours\)|server CPU per delivery" fan-$TAG.out | head
