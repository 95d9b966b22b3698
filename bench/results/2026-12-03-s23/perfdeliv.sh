#!/bin/bash
# perf record of the service's threads over the with-subscribers window of fanout --subscribers 1000
BIN=$1; O=/tmp/s23/pd
$BIN --ephemeral --webhook-secret bench-secret --webhook-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:18081 --admin-listen 127.0.0.1:18082 > /dev/null 2>&1 &
P=$!; sleep 1
/work/bin/s23/profile-state-bench --webhook 127.0.0.1:18080 --grpc 127.0.0.1:18081 --no-baseline fanout --subscribers 1000 --rounds 1 --duration 6s > $O.out 2>&1 &
B=$!
until grep -q "ours with 0 subscribers" $O.out 2>/dev/null; do sleep 0.05; done
sleep 3
perf record -e cpu-clock -F 1999 --call-graph dwarf,16384 -p $P -o $O.data -- sleep 4 > /dev/null 2>&1
wait $B; kill $P
grep "ours with 1000" $O.out
