#!/bin/bash
# usage: ab-gqi.sh PAIRS MODE VAL_A VAL_B: /work/bin/s12-gqi with GQI=A / GQI=B, fresh service per run, alternated
P=$1; MODE=$2; A=$3; B=$4
for i in $(seq 1 $P); do
  if (( i % 2 == 1 )); then order="$A $B"; else order="$B $A"; fi
  for v in $order; do
    d=$(mktemp -d /work/ref12/dd.XXXX)
    if [ $MODE = eph ]; then a=--ephemeral; else a="--data-dir $d"; fi
    GQI=$v /work/bin/s12-gqi --webhook-secret bench-secret $a --webhook-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:18081 --admin-listen 127.0.0.1:18082 > /dev/null 2>&1 &
    pid=$!; sleep 0.5
    out=$(/work/bin/s11-bench ingest --webhook 127.0.0.1:18080 --grpc 127.0.0.1:18081 --rounds 1 --duration 8s --warmup 2s --no-baseline 2>&1)
    r=$(echo "$out" | grep -oE "ours: +[0-9]+" | grep -oE "[0-9]+$")
    t=$(awk '{print $14+$15}' /proc/$pid/stat)
    n=$(curl -s 127.0.0.1:18082/metrics | awk '/^profile_state_webhooks_total/{s+=$2} END{print s}')
    c=$(python3 -c "print(round($t*1e4/$n,1))")
    kill $pid; wait $pid 2>/dev/null
    echo "$i GQI=$v req/s=$r cpu_us=$c load=$(cut -d' ' -f1 /proc/loadavg)"
    rm -rf $d
  done
done
