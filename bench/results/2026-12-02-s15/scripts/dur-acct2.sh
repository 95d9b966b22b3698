#!/bin/bash
# per-request CPU, syscalls and context switches of the service, --ephemeral vs durable, split by thread name
BIN=${1:-/work/bin/s11-c}
EV=syscalls:sys_enter_writev,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,syscalls:sys_enter_pwrite64,syscalls:sys_enter_fdatasync,context-switches,task-clock
for mode in ${MODES:-eph dur eph dur}; do
  d=$(mktemp -d /work/ref13/dd.XXXX)
  if [ $mode = eph ]; then a=--ephemeral; else a="--data-dir $d"; fi
  env $ENVV $BIN --webhook-secret bench-secret $a --webhook-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:18081 --admin-listen 127.0.0.1:18082 > /dev/null 2>&1 &
  sp=$!; sleep 0.5
  /work/bin/s11-bench ingest --webhook 127.0.0.1:18080 --grpc 127.0.0.1:18081 --rounds 1 --duration 10s --warmup 3s --no-baseline > /tmp/da-$mode.out 2>&1 &
  bp=$!
  count(){ curl -s 127.0.0.1:18082/metrics | awk '/^profile_state_webhooks_total/{s+=$2} END{print s+0}'; }
  while [ $(count) -lt 120000 ]; do sleep 0.2; done
  n0=$(count)
  perf stat --per-thread -x, -e $EV -p $sp -- sleep 5 2> /tmp/da-$mode.csv
  n1=$(count)
  wait $bp; kill $sp; wait $sp 2>/dev/null; rm -rf $d
  python3 - $mode $((n1-n0)) <<'PY'
import sys,csv,collections
mode,n=sys.argv[1],int(sys.argv[2])
tot=collections.defaultdict(float); byth=collections.defaultdict(float)
for row in csv.reader(open(f'/tmp/da-{mode}.csv')):
    if len(row)<4: continue
    th=row[0].rsplit('-',1)[0]
    try: v=float(row[1])
    except: continue
    ev=row[3].replace('syscalls:sys_enter_','')
    tot[ev]+=v
    if ev=='task-clock': byth[th]+=v
print(mode, n, 'webhooks;', ' '.join(f"{k}={(v*1e3 if k=='task-clock' else v)/n:.2f}" for k,v in tot.items()), '| cpu us/req by thread:', ' '.join(f"{k}={v*1e3/n:.1f}" for k,v in sorted(byth.items(), key=lambda x:-x[1])[:4]))
PY
done
