#!/usr/bin/env bash
# A one-node SLURM on localhost for the cluster test (tests/cluster/test_slurm.py).
#
#   tests/cluster/slurm_up.sh STATE_DIR     install (Debian, as root) and start munged, slurmctld, slurmd
#   tests/cluster/slurm_down.sh STATE_DIR   stop them by pid and restore /etc/slurm/slurm.conf
#
# Everything lives under STATE_DIR (keys, sockets, spool, logs, pids) except slurm.conf, which
# must be at /etc/slurm/slurm.conf: the executor plugin's job step clears SLURM_* variables, so
# SLURM_CONF would not reach srun inside a job. An existing slurm.conf is kept aside and put
# back by slurm_down.sh. Loopback only; no accounting database (the test asks the plugin for the
# squeue status command, and MinJobAge keeps finished jobs visible to it). Exit 3: cannot install.
set -euo pipefail
state=$(realpath -m "${1:?usage: slurm_up.sh STATE_DIR}")
mkdir -p "$state"/{run,log,spool,ctld,munge}
chmod 755 "$state" "$state/run"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "slurm_up.sh: slurmctld/munged missing and not root: cannot install slurm-wlm" >&2
    exit 3
  fi
  export DEBIAN_FRONTEND=noninteractive
  pkgs="slurmctld slurmd slurm-client munge"
  if ! apt-get install -y --no-install-recommends $pkgs >"$state/log/apt.log" 2>&1; then
    if ! { apt-get update >>"$state/log/apt.log" 2>&1 \
           && apt-get install -y --no-install-recommends $pkgs >>"$state/log/apt.log" 2>&1; }; then
      echo "slurm_up.sh: could not install $pkgs (see $state/log/apt.log)" >&2
      exit 3
    fi
  fi
fi

host=$(hostname -s)
cpus=$(nproc)
# the profile asks up to 32 GB for training; the node claims 64 GB (config_overrides below makes
# slurmd take the configured size instead of the detected one; memory is not enforced here)
mem_mb=65536

dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$state/munge/munge.key"
munged -F -f --socket="$state/run/munge.socket" --key-file="$state/munge/munge.key" \
  --log-file="$state/log/munged.log" --pid-file="$state/run/munged.pid" \
  --seed-file="$state/munge/munged.seed" >/dev/null 2>&1 &
echo $! >"$state/munged.pid"

mkdir -p /etc/slurm
if [ -e /etc/slurm/slurm.conf ] && [ ! -e "$state/slurm.conf.orig" ]; then
  cp -p /etc/slurm/slurm.conf "$state/slurm.conf.orig"
fi
cat >/etc/slurm/slurm.conf <<CONF
# written by harmodiff tests/cluster/slurm_up.sh (state in $state)
ClusterName=harmodiff-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$state/run/munge.socket
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=300
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
MpiDefault=none
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:1 State=UNKNOWN
# the profile's placeholder partitions, both on this node; one pretend GPU (no device file) so
# that jobs asking for a GPU are scheduled the way a real GPU partition would schedule them
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host MaxTime=INFINITE State=UP
CONF
if [ -e /etc/slurm/gres.conf ] && [ ! -e "$state/gres.conf.orig" ]; then
  cp -p /etc/slurm/gres.conf "$state/gres.conf.orig"
fi
cat >/etc/slurm/gres.conf <<CONF
# written by harmodiff tests/cluster/slurm_up.sh
NodeName=$host Name=gpu File=/dev/null Count=1
CONF

# wait for munged's socket before the SLURM daemons authenticate through it
for _ in $(seq 50); do [ -S "$state/run/munge.socket" ] && break; sleep 0.1; done
slurmctld -D -i >"$state/log/slurmctld.out" 2>&1 &
echo $! >"$state/slurmctld.pid"
slurmd -D >"$state/log/slurmd.out" 2>&1 &
echo $! >"$state/slurmd.pid"

for _ in $(seq 100); do
  if sinfo -h -p cpu -o %t 2>/dev/null | grep -qx idle; then
    echo "slurm up: node $host idle ($cpus CPUs, ${mem_mb} MB), state in $state"
    exit 0
  fi
  sleep 0.2
done
echo "slurm_up.sh: node did not become idle; see $state/log" >&2
sinfo >&2 || true
exit 1
