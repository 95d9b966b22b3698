#!/bin/bash
# usage: ab.sh TAG PAIRS BIN_A BIN_B [bench args...]: the bench's ingest scenario alternated A B, B A, ...
TAG=$1; P=$2; A=$3; B=$4; shift 4
mkdir -p ./$TAG
for i in $(seq ${START:-1} $P); do
  if (( i % 2 == 1 )); then order="$A $B"; else order="$B $A"; fi
  for bin in $order; do
    n=$(basename $bin)
    l=$(cut -d' ' -f1 /proc/loadavg)
    profile-state-bench ingest --rounds 2 --duration 8s --server-bin $bin --json ./$TAG/$i-$n.json "$@" > ./$TAG/$i-$n.out 2>&1
    echo "$i $n load=$l $(grep -E '^ingest +(req/s|server CPU|durable:)' ./$TAG/$i-$n.out | sed -E 's/ +/ /g' | awk '{print $2"_"$3"_"$4"="$(NF-5)"/"$(NF-2)}' | tr '\n' ' ')"
  done
done
