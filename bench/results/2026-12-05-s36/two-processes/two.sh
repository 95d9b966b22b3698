#!/bin/bash
# Upper bound of sharded ingest: two independent --ephemeral processes on one SO_REUSEPORT port.
B=/work/bin/s36/reuseport
mode=$1; out=$2
start() { PS_EXP_REUSEPORT=1 $B --ephemeral --webhook-secret bench-secret --webhook-listen 127.0.0.1:39601 --grpc-listen 127.0.0.1:$1 --admin-listen 127.0.0.1:$2 > /dev/null 2>&1 & echo $!; }
P1=$(start 39602 39603)
[ "$mode" = two ] && P2=$(start 39612 39613)
for i in $(seq 50); do curl -s -o /dev/null 127.0.0.1:39603/readyz && break; sleep 0.2; done
[ "$mode" = two ] && for i in $(seq 50); do curl -s -o /dev/null 127.0.0.1:39613/readyz && break; sleep 0.2; done
uptime > $out.load
PS_EXP_SKIP_HELD=1 /work/bin/s36/bench-skipheld --webhook 127.0.0.1:39601 --grpc 127.0.0.1:39602 ingest --rounds 2 --duration 8s > $out 2>&1
uptime >> $out.load
kill $P1 $P2 2>/dev/null; wait
