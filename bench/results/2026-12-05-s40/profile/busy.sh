#!/bin/bash
# box and server CPU over 3 s of the ingest load (ours only); after BIN and O, the service's mode flags
BIN=$1; O=$2; shift 2
$BIN "$@" --webhook-secret bench-secret --webhook-listen 127.0.0.1:39621 --grpc-listen 127.0.0.1:39622 --admin-listen 127.0.0.1:39623 > /dev/null 2>&1 &
P=$!; sleep 1
/work/bin/s40/bench --webhook 127.0.0.1:39621 --grpc 127.0.0.1:39622 --no-baseline ingest --rounds 1 --duration 10s --warmup 2s > $O.out 2>&1 &
B=$!
sleep 8
a=($(head -1 /proc/stat)); t0=$(awk '{print $14" "$15}' /proc/$P/stat)
sleep 3
b=($(head -1 /proc/stat)); t1=$(awk '{print $14" "$15}' /proc/$P/stat)
tot=0; for i in 1 2 3 4 5 6 7 8; do tot=$((tot + b[i] - a[i])); done
echo "box busy: $(( (tot - (b[4]-a[4]) - (b[5]-a[5])) * 100 / tot ))% ; idle $((b[4]-a[4])) iowait $((b[5]-a[5])) of $tot ticks; server user/sys before: $t0 after: $t1"
wait $B; kill $P; wait $P 2>/dev/null
grep -E "ours:" $O.out
