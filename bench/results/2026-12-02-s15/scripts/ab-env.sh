#!/bin/bash
# usage: ab-env.sh TAG PAIRS BIN ENV_B [bench args]: one binary, the switch ENV_B off (A) and on (B), order swapped each pair
TAG=$1; P=$2; BIN=$3; EB=$4; shift 4
mkdir -p /work/ref15/$TAG
for i in $(seq 1 $P); do
  if (( i % 2 == 1 )); then order="A B"; else order="B A"; fi
  for v in $order; do
    if [ $v = B ]; then e="--server-env=$EB"; else e="--server-env=UNUSED_SWITCH=1"; fi
    l=$(cut -d' ' -f1 /proc/loadavg)
    /work/bin/s11-bench ingest --rounds 2 --duration 8s --server-bin $BIN $e --json /work/ref15/$TAG/$i-$v.json "$@" > /work/ref15/$TAG/$i-$v.out 2>&1
    echo "$i $v load=$l $(grep -E '^ingest +(req/s|server CPU)' /work/ref15/$TAG/$i-$v.out | awk '{print $NF=="-"?"":"", $0}' | sed -E 's/ +/ /g' | cut -c1-200 | awk '{for(i=1;i<=NF;i++) if ($i ~ /^[0-9.]+$/ && !r) {printf "%s ", $i; r=1}; r=0}') ratio=$(grep -E '^ingest +req/s' /work/ref15/$TAG/$i-$v.out | awk '{print $(NF-2)}' | tr '\n' '/')"
  done
done
