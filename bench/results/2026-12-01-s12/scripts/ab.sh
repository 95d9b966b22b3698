#!/bin/bash
# usage: ab.sh TAG PAIRS BIN_A BIN_B [bench args...]: the bench's ingest scenario alternated A B, B A, ...
TAG=$1; P=$2; A=$3; B=$4; shift 4
mkdir -p /work/ref12/$TAG
for i in $(seq ${START:-1} $P); do
  if (( i % 2 == 1 )); then order="$A $B"; else order="$B $A"; fi
  for bin in $order; do
    n=$(basename $bin)
    l=$(cut -d' ' -f1 /proc/loadavg)
    /work/bin/s11-bench ingest --rounds 2 --duration 8s --server-bin $bin --json /work/ref12/$TAG/$i-$n.json "$@" > /work/ref12/$TAG/$i-$n.out 2>&1
    echo "$i $n load=$l $(grep -E 'req/s \(--ephemeral\)|durable vs --ephemeral|server CPU per req' /work/ref12/$TAG/$i-$n.out | awk '{printf "%s=%s ", $3$4, $(NF-3)}')"
  done
done
