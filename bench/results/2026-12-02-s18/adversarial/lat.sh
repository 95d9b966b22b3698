#!/bin/bash
BIN=$1; C=$2
D=/tmp/adv18/l-$$; rm -rf $D; mkdir -p $D
/work/bin/$BIN --webhook-secret bench-secret --webhook-listen 127.0.0.1:19080 --grpc-listen 127.0.0.1:19081 --admin-listen 127.0.0.1:19082 --data-dir $D >/dev/null 2>&1 &
P=$!
for i in $(seq 50); do curl -s -o /dev/null 127.0.0.1:19082/metrics && break; sleep 0.1; done
TID=$(for t in /proc/$P/task/*; do [ "$(cat $t/comm)" = ingest ] && basename $t; done)
c0=$(awk '{print $1}' /proc/$P/task/$TID/schedstat)
OUT=$(/work/bin/bench17 ingest --webhook 127.0.0.1:19080 --grpc 127.0.0.1:19081 --no-baseline --customers 1000 --concurrency $C $EXTRA --duration 5s --warmup 1s --rounds 1 2>&1)
c1=$(awk '{print $1}' /proc/$P/task/$TID/schedstat)
kill $P; wait $P 2>/dev/null; rm -rf $D
R=$(echo "$OUT" | awk '/^ingest +req\/s/{r=$(NF-4)} /latency p50/{a=$(NF-4)} /latency p99/{b=$(NF-4)} END{print "rps="r" p50="a" p99="b}')
N=$(echo "$OUT" | awk '/^ingest +req\/s/{print $(NF-4)}')
echo "$BIN c=$C $EXTRA $R ingestCPU=$(( (c1-c0)/1000000 ))ms load=$(cut -d' ' -f1 /proc/loadavg)"
