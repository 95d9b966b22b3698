#!/bin/bash
# wake.sh BIN LABEL: the service's per-thread CPU ticks and context switches over the
# with-subscribers window of `fanout --subscribers 1000` (1 round), per delivery
BIN=$1; L=$2; O=/tmp/s23/wake-$L
$BIN --ephemeral --webhook-secret bench-secret --webhook-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:18081 --admin-listen 127.0.0.1:18082 > /dev/null 2>&1 &
P=$!; sleep 1
snap() { for t in /proc/$P/task/*; do c=$(cat $t/comm | tr ' ' _); cs=$(awk '/ctxt_switches/{s+=$2} END{print s}' $t/status); echo "${c%%-[0-9]*} $(awk '{print $14+$15}' $t/stat) $cs"; done | awk '{cpu[$1]+=$2; cs[$1]+=$3} END{for(k in cpu) print k, cpu[k], cs[k]}' | sort; }
/work/bin/s23/profile-state-bench --webhook 127.0.0.1:18080 --grpc 127.0.0.1:18081 --no-baseline fanout --subscribers 1000 --rounds 1 --duration 6s > $O.out 2>&1 &
B=$!
until grep -q "ours with 0 subscribers" $O.out 2>/dev/null; do sleep 0.05; done; snap > $O.a
until grep -q "ours with 1000 subscribers" $O.out 2>/dev/null; do sleep 0.05; done; snap > $O.b
wait $B; kill $P
D=$(grep "ours with 1000 subscribers" $O.out | sed 's/.*req\/s, \([0-9]*\) deliveries/\1/')
echo "$L deliveries $D $(grep 'ours with 1000' $O.out | sed 's/.*: \([0-9]*\) req.*/\1 req\/s/')"
join $O.a $O.b | awk -v d=$D '{printf "%s cpu %.1f us/delivery, ctxsw %.2f per delivery\n", $1, ($4-$2)*10000/d, ($5-$3)/d}'
