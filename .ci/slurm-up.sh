#!/usr/bin/env bash
# Brings up a throwaway one-node Slurm cluster (Debian's slurm-wlm + munge) so that the
# `--launcher slurm` tests can submit real jobs. No systemd: the daemons are started by
# hand. Exits non-zero with a message when it cannot, so CI can go on without Slurm.
# Idempotent: a second run with the cluster already up only re-checks it.
set -euo pipefail

die() { echo "slurm-up: $*" >&2; exit 1; }

CONF=/etc/slurm/slurm.conf
LOG=/var/log/slurm
NODE=$(hostname -s)

[ "$(id -u)" = 0 ] || die "needs root (apt, munge key, daemons)"

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
# Asking sinfo with no controller costs ~9 s of retries, so look at the pid first.
if alive /run/slurmctld.pid && alive /run/slurmd.pid && [ "$(node_state)" = idle ]; then
    echo "slurm-up: cluster already up (node $NODE idle)"; exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "slurm-wlm/munge missing and no apt-get to install them"
    # policy-rc.d stops the packages' maintainer scripts from trying to start services.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends slurm-wlm munge >/dev/null; } || die "apt-get install slurm-wlm munge failed"
    rm -f /usr/sbin/policy-rc.d
fi

# Stop whatever is half-up so every daemon starts fresh on the config written below.
"$(dirname "$0")/slurm-down.sh" >/dev/null 2>&1 || true

# munge: every Slurm RPC is signed with this key; munged must own it and run as 'munge'.
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then mungekey --create --force >/dev/null
    else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged || die "munged failed to start (see /var/log/munge/munged.log)"
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.25; done
    munge -n | unmunge >/dev/null 2>&1 || die "munge does not work"
fi

# RealMemory a little under the real total: slurmd drains a node that reports less than configured.
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.95)}' /proc/meminfo)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG"
cat > "$CONF" <<EOF
# Written by .ci/slurm-up.sh: a one-node test cluster, not for production.
ClusterName=nclayers-ci
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
# No cgroups in containers/CI VMs: track processes by /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Lets 'scontrol requeue' and submitit's checkpoint/requeue put jobs back in the queue.
JobRequeue=1
# Trust slurm.conf over what slurmd detects, and bring the node back by itself after a restart.
SlurmdParameters=config_overrides
ReturnToService=2
# Short poll intervals: tests wait on job state changes.
SchedulerParameters=sched_interval=2
MinJobAge=300
KillWait=5
NodeName=$NODE CPUs=$(nproc) RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

started=$(date +%s)
slurmctld || die "slurmctld failed to start (see $LOG/slurmctld.log)"
slurmd || die "slurmd failed to start (see $LOG/slurmd.log)"

# slurmctld restores the node's old state from disk, so 'idle' alone may predate this slurmd:
# also wait for the node to have registered since we started it.
registered() {
    local t
    t=$(scontrol show node "$NODE" 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')
    [ -n "$t" ] && [ "$(date -d "$t" +%s 2>/dev/null || echo 0)" -ge $((started - 1)) ]
}
for _ in $(seq 60); do
    state=$(node_state || true)
    registered || state="unregistered"
    case "$state" in
        idle) echo "slurm-up: cluster up: node $NODE idle in partition debug ($(nproc) CPUs, ${MEM_MB} MB)"; exit 0 ;;
        down*|drain*|fail*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
done
die "node $NODE not idle after 60 s (state '${state:-none}'); see $LOG/slurmctld.log and $LOG/slurmd.log"
