#!/bin/bash
# syscalls and context switches per request: no-op baseline vs ours (--ephemeral), same client
EV=syscalls:sys_enter_writev,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,context-switches,task-clock
BIN=${1:-/work/bin/s10-final}
B=/work/bin/s10-bench
$BIN --webhook-secret bench-secret --ephemeral --webhook-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:18081 --admin-listen 127.0.0.1:18082 > /dev/null 2>&1 &
sp=$!; sleep 0.5
$B --client-id bench baseline > /tmp/noop-addr.json &
np=$!; sleep 0.5
http=$(python3 -c "import json;print(json.load(open('/tmp/noop-addr.json'))['http'])")
$B ingest --webhook 127.0.0.1:18080 --grpc 127.0.0.1:18081 --rounds 1 --duration 1s --warmup 0s --no-baseline > /dev/null 2>&1  # preload ours
for target in noop ours noop ours; do
  if [ $target = noop ]; then w=$http; p=$np; else w=127.0.0.1:18080; p=$sp; fi
  $B ingest --webhook $w --grpc 127.0.0.1:18081 --rounds 1 --duration 9s --warmup 3s --no-baseline > /tmp/sys-$target.out 2>&1 &
  bp=$!
  sleep 5.5
  perf stat -x, -e $EV -p $p -- sleep 5 2> /tmp/perf-$target.csv
  wait $bp
  r=$(grep -oE "ours: +[0-9]+" /tmp/sys-$target.out | grep -oE "[0-9]+$")
  python3 - $target $r <<'PY'
import sys,csv
t,r=sys.argv[1],float(sys.argv[2]); n=r*5
out=[]
for row in csv.reader(open(f'/tmp/perf-{t}.csv')):
    if len(row)<3 or not row[0].replace('.','').isdigit(): continue
    v=float(row[0]); name=row[2].replace('syscalls:sys_enter_','')
    out.append(f"{name}={v/n:.2f}" if name!='task-clock' else f"cpu_us={v*1e3/n:.1f}")
print(t, int(r), ' '.join(out))
PY
done
kill $sp $np
