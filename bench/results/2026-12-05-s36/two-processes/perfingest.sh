#!/bin/bash
BIN=$1; O=$2
$BIN --ephemeral --webhook-secret bench-secret --webhook-listen 127.0.0.1:39621 --grpc-listen 127.0.0.1:39622 --admin-listen 127.0.0.1:39623 > /dev/null 2>&1 &
P=$!; sleep 1
/work/bin/s35/bench --webhook 127.0.0.1:39621 --grpc 127.0.0.1:39622 --no-baseline ingest --rounds 1 --duration 10s --warmup 2s > $O.out 2>&1 &
B=$!
sleep 9
T=$(for t in /proc/$P/task/*; do [ "$(cat $t/comm)" = ingest ] && basename $t; done)
perf record -e cpu-clock -F 2999 -g -t $T -o $O.data -- sleep 4 > /dev/null 2>&1
wait $B; kill $P
grep "req/s" $O.out
