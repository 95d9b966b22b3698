#!/bin/bash
# perfthr.sh BIN MODE OUT [THREAD [PERF ARGS]]: perf record of one of the service's threads (default ingest) for 5 s
# of ingest; prints webhooks in the window. The journal's, with call graphs: perfthr.sh BIN durable jr.data journal -g
BIN=$1; MODE=$2; OUT=$3; THREAD=${4:-ingest}; shift 3; shift; PERF_ARGS="$*"
D=$(mktemp -d /work/notes/s18/data.XXXX)
ARGS="--data-dir $D"; [ "$MODE" = ephemeral ] && ARGS="--ephemeral"
$BIN --webhook-secret bench-secret --webhook-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:18081 --admin-listen 127.0.0.1:18082 $ARGS > /tmp/s18-svc.log 2>&1 &
sp=$!; sleep 0.5
/work/bin/bench17 ingest --webhook 127.0.0.1:18080 --grpc 127.0.0.1:18081 --rounds 1 --duration 14s --warmup 2s --no-baseline > /tmp/s18-bench.out 2>&1 &
bp=$!
count(){ curl -s 127.0.0.1:18082/metrics | awk '/^profile_state_webhooks_total/{s+=$2} END{print s+0}'; }
while [ $(count) -lt 150000 ]; do sleep 0.2; done
tid=$(grep -l "^$THREAD\$" /proc/$sp/task/*/comm | head -1 | cut -d/ -f5)
a=$(count)
perf record $PERF_ARGS -F 4999 -t $tid -o $OUT -- sleep 5 2>/dev/null >/dev/null
b=$(count)
echo "webhooks in window: $((b-a))"
wait $bp; kill $sp; wait $sp 2>/dev/null; rm -rf $D
