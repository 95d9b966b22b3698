#!/bin/bash
# Session 42: the session's fixes on measured paths ("new", 183542f: every gRPC answer's first
# message read as the call returns and counted in the answer budgets; the sequencer's stall
# check while a batch syncs) against the session's start ("base", ee3dcec). Alternated, one
# round each, ours only. Arguments: the pairs' numbers. ORDER="new base" runs each pair the
# other way round. SCEN: get, ingest (ephemeral and durable), x100 (fan-out 1,000 x 100).
B=/work/bin/s42/profile-state-bench
# NEW names the build against base (ab3.log: NEW=new2, the journal state read before it is
# sent; ab4.log: NEW=new3, the stall found by a task beside the sequencer reading an atomic
# the sequencer set per batch; ab5.log: NEW=nostall, new3 without that atomic's setting or
# the task; ab6.log: NEW=new4, the atomic set by the journal's thread, kept). ab3 ran as a
# copy of this script with "new2" in place of "new".
for pair in "$@"; do
  for build in ${ORDER:-base ${NEW:-new}}; do
    for scenario in ${SCEN:-get ingest}; do
      case $scenario in
        x100) args="fanout --subscribers 1000 --streams-per-connection 100 --duration 12s" ;;
        *) args="$scenario --duration 8s" ;;
      esac
      echo "== $scenario $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
      $B $args --server-bin /work/bin/s42/$build --no-baseline --rounds 1 \
        --json $scenario-$build-$pair.json > $scenario-$build-$pair.txt 2>&1
      grep -E 'ours' $scenario-$build-$pair.txt | head -4
    done
  done
done
