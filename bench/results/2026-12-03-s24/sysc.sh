#!/bin/bash
BIN=$1; O=/tmp/s24/sc
$BIN --ephemeral --webhook-secret bench-secret --webhook-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:18081 --admin-listen 127.0.0.1:18082 > /dev/null 2>&1 &
P=$!; sleep 1
/work/bin/s24/profile-state-bench --webhook 127.0.0.1:18080 --grpc 127.0.0.1:18081 --no-baseline ingest --rounds 1 --duration 8s --warmup 2s > $O.out 2>&1 &
B=$!
sleep 4
T=$(for t in /proc/$P/task/*; do [ "$(cat $t/comm)" = ingest ] && basename $t; done)
timeout -s INT 3 strace -c -p $T -o $O.strace > /dev/null 2>&1
wait $B; kill $P
cat $O.strace
