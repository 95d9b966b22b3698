#!/bin/bash
BIN=$1
D=/tmp/adv18/s-$$; rm -rf $D; mkdir -p $D
/work/bin/$BIN --webhook-secret bench-secret --webhook-listen 127.0.0.1:19080 --grpc-listen 127.0.0.1:19081 --admin-listen 127.0.0.1:19082 --data-dir $D >/tmp/adv18/shut-$BIN.log 2>&1 &
P=$!
for i in $(seq 50); do curl -s -o /dev/null 127.0.0.1:19082/metrics && break; sleep 0.1; done
/work/bin/bench17 ingest --webhook 127.0.0.1:19080 --grpc 127.0.0.1:19081 --no-baseline --customers 1000 --concurrency 64 --duration 10s --warmup 1s --rounds 1 >/dev/null 2>&1 &
B=$!
sleep 4
t0=$(date +%s%N); kill -TERM $P; wait $P; rc=$?; t1=$(date +%s%N)
kill $B 2>/dev/null; wait $B 2>/dev/null
echo "$BIN shutdown_ms=$(( (t1-t0)/1000000 )) rc=$rc load=$(cut -d' ' -f1 /proc/loadavg)"
rm -rf $D
