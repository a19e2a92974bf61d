#!/usr/bin/env bash
# Stop what slurm_up.sh started (by pid) and put back any previous /etc/slurm/slurm.conf.
set -uo pipefail
state=$(realpath -m "${1:?usage: slurm_down.sh STATE_DIR}")
for d in slurmd slurmctld munged; do
  if [ -f "$state/$d.pid" ]; then
    pid=$(cat "$state/$d.pid")
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
    rm -f "$state/$d.pid"
  fi
done
for f in slurm.conf gres.conf; do
  if [ -f "$state/$f.orig" ]; then
    mv "$state/$f.orig" "/etc/slurm/$f"
  elif grep -q "written by harmodiff" "/etc/slurm/$f" 2>/dev/null; then
    rm -f "/etc/slurm/$f"
  fi
done
echo "slurm down"
