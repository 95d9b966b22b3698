#!/bin/bash
# a2_stall_defaults.py against main's release build and s54-stall's, back to back, default flags.
for tag in main f4; do
  echo "== $tag $(date -u +%H:%M:%S) load: $(cut -d' ' -f1-3 /proc/loadavg)"
  BIN=/tmp/f4/profile-state-$tag TAG=$tag /work/adv30/venv/bin/python a2_stall_defaults.py
  echo "   after $(date -u +%H:%M:%S) load: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "   cut warnings: $(grep -c 'cut a gRPC connection whose streams held' stalldef-$tag.log)"
done
