#!/bin/bash
# Session 43: the answer budgets counted until the socket takes the bytes (AnswersSent on
# every gRPC connection) and the request body timeout's changes ("new", 927e805) against the
# session's start ("base", 167f2f3). Alternated, one round each, ours only. Arguments: the
# pairs' numbers; ORDER="new base" runs a pair the other way round. SCEN: get, x100 (fan-out
# 1,000 x 100 per connection).
B=/work/bin/s43/profile-state-bench
for pair in "$@"; do
  for build in ${ORDER:-base new}; do
    for scenario in ${SCEN:-get x100}; do
      case $scenario in
        x100) args="fanout --subscribers 1000 --streams-per-connection 100 --duration 12s" ;;
        *) args="$scenario --duration 8s" ;;
      esac
      echo "== $scenario $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
      $B $args --server-bin /work/bin/s43/$build --no-baseline --rounds 1 \
        --json $scenario-$build-$pair.json > $scenario-$build-$pair.txt 2>&1
      grep -E 'ours' $scenario-$build-$pair.txt | head -4
    done
  done
done
