#!/bin/bash
# usage: ab-eph.sh PAIRS MODE BIN... ; MODE=eph|dur ; alternated order per pair; prints req/s and server CPU/req
P=$1; MODE=$2; shift 2
bins=("$@")
for i in $(seq 1 $P); do
  if (( i % 2 == 0 )); then order=$(printf "%s\n" "${bins[@]}" | tac); else order=$(printf "%s\n" "${bins[@]}"); fi
  for bin in $order; do
    d=$(mktemp -d /work/ref11/dd.XXXX)
    if [ $MODE = eph ]; then a=--ephemeral; else a="--data-dir $d"; fi
    $bin --webhook-secret bench-secret $a --webhook-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:18081 --admin-listen 127.0.0.1:18082 > /dev/null 2>&1 &
    pid=$!; sleep 0.5
    out=$(/work/bin/s10-bench ingest --webhook 127.0.0.1:18080 --grpc 127.0.0.1:18081 --rounds 1 --duration 8s --warmup 2s --no-baseline 2>&1)
    r=$(echo "$out" | grep -oE "ours: +[0-9]+" | grep -oE "[0-9]+$")
    t=$(awk '{print $14+$15}' /proc/$pid/stat)
    n=$(curl -s 127.0.0.1:18082/metrics | awk '/^profile_state_webhooks_total/{s+=$2} END{print s}')
    c=$(python3 -c "print(round($t*1e4/$n,1))")
    kill $pid; wait $pid 2>/dev/null
    echo "$i $(basename $bin) req/s=$r cpu_us=$c load=$(cut -d' ' -f1 /proc/loadavg)"
    rm -rf $d
  done
done
