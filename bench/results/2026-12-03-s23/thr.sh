#!/bin/bash
# thr.sh BIN: per-thread CPU (ticks) of the service during 8 s of ingest
BIN=$1
$BIN --ephemeral --webhook-secret bench-secret --webhook-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:18081 --admin-listen 127.0.0.1:18082 > /dev/null 2>&1 &
P=$!; sleep 1
/work/bin/s23/profile-state-bench --webhook 127.0.0.1:18080 --grpc 127.0.0.1:18081 --no-baseline ingest --rounds 1 --duration 14s --warmup 2s > /tmp/s23/thr-load.out 2>&1 &
L=$!; sleep 6
snap() { for t in /proc/$P/task/*; do echo "$(cat $t/comm | tr ' ' _) $(awk '{print $14+$15}' $t/stat)"; done; }
snap > /tmp/s23/ta; sleep 8; snap > /tmp/s23/tb
paste /tmp/s23/ta /tmp/s23/tb | awk '{d=$4-$2; s+=d; if(d>0) print $1, d} END {print "total", s}'
wait $L; grep "req/s (--eph" /tmp/s23/thr-load.out; kill $P
