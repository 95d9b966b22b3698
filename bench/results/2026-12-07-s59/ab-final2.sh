#!/bin/bash
# Signed deliveries every 20 ms (stall2.py) while N senders post refused bodies back to back for
# 15 s: 16 MiB of 1e20 (N=2), 1 MiB of 1e20 (N=4), 64 KiB nested 9 deep of 1e20 (N=16);
# base (a607efd) vs final2 (the change: every check over the compact form on a thread of its own, nice 10).
PY=/work/adv30/venv/bin/python
bin() { echo /work/bin/s59/$1; }
field() { python3 -c "import json;print(json.load(open('/work/adv35/srv_ab59.json'))['$1'])"; }
python3 -c "open('/work/s59/16m-1e20.json','w').write('{\"client_id\":\"2155\",\"customer_id\":\"u\",\"x\":['+','.join(['1e20']*((16<<20)//5-20))+']}')"
for pair in 1; do
  order="base final2"; [ $pair = 2 ] && order="final2 base"
  for case in "2 /work/s59/16m-1e20.json" "4 /work/s59/1m-1e20.json" "16 /work/s59/deep9-1e20.json"; do
    set -- $case
    for build in $order; do
      BIN=$(bin $build) $PY /work/adv35/srv_up.py ab59 --max-body-bytes 16777216 > /dev/null
      echo "== $build $pair N=$1 $(basename $2) $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $($PY stall2.py ab59 $1 15 $2)"
      kill $(field pid); sleep 1
    done
  done
done
