#!/bin/bash
# The 1.4 MB row of F4 (a2_vanish.py), main's release build then s54-stall's, back to back.
for tag in main f4; do
  echo "== $tag $(date -u +%H:%M:%S) load: $(cut -d' ' -f1-3 /proc/loadavg)"
  WSIZE=1400000 MAXBODY=2000000 CUSTOMERS=10 RUN=40 HALF=0 STALL_READ=25 STALL_SOCK=0 \
    BIN=/tmp/f4/profile-state-$tag TAG=$tag timeout 300 /work/adv30/venv/bin/python a2_vanish.py 2>&1 | head -12
  echo "   after $(date -u +%H:%M:%S) load: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "   cut warnings: $(grep -c 'cut a gRPC connection whose streams held' vanish-$tag.log)"
done
