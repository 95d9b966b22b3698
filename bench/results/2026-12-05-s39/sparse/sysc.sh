#!/bin/bash
BIN=$1; O=$2
$BIN --ephemeral --webhook-secret bench-secret --webhook-listen 127.0.0.1:39621 --grpc-listen 127.0.0.1:39622 --admin-listen 127.0.0.1:39623 > /dev/null 2>&1 &
P=$!; sleep 1
/work/bin/s39/bench --webhook 127.0.0.1:39621 --grpc 127.0.0.1:39622 --no-baseline ingest --rounds 1 --duration 10s --warmup 2s > $O.out 2>&1 &
B=$!
sleep 8
curl -s 127.0.0.1:39623/metrics | grep -E '^profile_state_webhooks_total|^profile_state_webhook_requests_total' | head -3 > $O.m0
perf stat -e 'syscalls:sys_enter_*' -p $P -o $O.stat -- sleep 3 > /dev/null 2>&1
curl -s 127.0.0.1:39623/metrics | grep -E '^profile_state_webhooks_total|^profile_state_webhook_requests_total' | head -3 > $O.m1
wait $B; kill $P
grep -E "req/s" $O.out
