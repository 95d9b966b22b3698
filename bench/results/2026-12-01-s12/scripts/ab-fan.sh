#!/bin/bash
# usage: ab-fan.sh TAG BIN_A BIN_B : fanout 1000 x 100 per connection, A B B A, one round each
TAG=$1; A=$2; B=$3
mkdir -p /work/ref12/$TAG
i=0
for bin in $A $B $B $A; do
  i=$((i+1)); n=$(basename $bin)
  l=$(cut -d' ' -f1 /proc/loadavg)
  /work/bin/s11-bench fanout --subscribers 1000 --streams-per-connection 100 --rounds 1 --duration 6s --server-bin $bin --json /work/ref12/$TAG/$i-$n.json > /work/ref12/$TAG/$i-$n.out 2>&1
  echo "$i $n load=$l"; grep -E "^fanout" /work/ref12/$TAG/$i-$n.out | sed 's/  */ /g'
done
