#!/bin/bash
# perf (frame pointers) of the durable server under the ingest load (ours only)
BIN=$1; O=$2; D=$3
rm -rf $D; mkdir -p $D
$BIN --data-dir $D --webhook-secret bench-secret --webhook-listen 127.0.0.1:39621 --grpc-listen 127.0.0.1:39622 --admin-listen 127.0.0.1:39623 > /dev/null 2>&1 &
P=$!; sleep 1
/work/bin/s40/bench --webhook 127.0.0.1:39621 --grpc 127.0.0.1:39622 --no-baseline ingest --rounds 1 --duration 10s --warmup 2s > $O.out 2>&1 &
B=$!
sleep 7
perf record -e cpu-clock -F 1999 --call-graph fp -p $P -o $O.data -- sleep 4 > /dev/null 2>&1
wait $B; kill $P; wait $P 2>/dev/null
grep -E "ours:" $O.out
