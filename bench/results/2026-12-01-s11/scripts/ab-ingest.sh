#!/bin/bash
# usage: ab-ingest.sh PAIRS BIN_A BIN_B: the bench's ingest scenario (no-op, ephemeral, durable in each round), alternated
P=$1; A=$2; B=$3
mkdir -p /work/ref11/abi
for i in $(seq ${START:-1} $P); do
  if (( i % 2 == 1 )); then order="$A $B"; else order="$B $A"; fi
  for bin in $order; do
    n=$(basename $bin)
    /work/bin/s10-bench ingest --rounds 2 --duration 8s --server-bin $bin --json /work/ref11/abi/$i-$n.json > /work/ref11/abi/$i-$n.out 2>&1
    echo "$i $n $(grep -E 'req/s \(--ephemeral\)|durable vs --ephemeral|server CPU per req' /work/ref11/abi/$i-$n.out | awk '{printf "%s=%s ", $3$4, $(NF-3)}') $(grep -o 'before: [0-9.]*' /work/ref11/abi/$i-$n.out)"
  done
done
