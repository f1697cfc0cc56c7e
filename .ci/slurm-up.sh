#!/usr/bin/env bash
# Brings up a throwaway one-node Slurm cluster (Debian's slurm-wlm + munge) so that the
# `--launcher slurm` tests can submit real jobs. No systemd: the daemons are started by
# hand. Exits non-zero with a message when it cannot, so CI can go on without Slurm.
# Idempotent: a second run with the cluster already up only re-checks it.
# SLURM_ACCOUNTING=1 also runs slurmdbd on a local MariaDB (+25 s of apt): without it `sacct`
# fails, so submitit reports every job as UNKNOWN and waits forever on a job killed before it
# wrote its result (scancel, node failure).
set -euo pipefail

die() { echo "slurm-up: $*" >&2; exit 1; }

CONF=/etc/slurm/slurm.conf
LOG=/var/log/slurm
NODE=$(hostname -s)
WANT=${SLURM_ACCOUNTING:-}   # unset: a running cluster is kept whichever way it was started
ACCT=${WANT:-0}
PKGS="slurm-wlm munge"; [ "$ACCT" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"

[ "$(id -u)" = 0 ] || die "needs root (apt, munge key, daemons)"

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
has_acct() { grep -q '^AccountingStorageType=accounting_storage/slurmdbd' "$CONF" 2>/dev/null && echo 1 || echo 0; }
# Asking sinfo with no controller costs ~9 s of retries, so look at the pids first.
if alive /run/slurmctld.pid && alive /run/slurmd.pid && { [ -z "$WANT" ] || [ "$(has_acct)" = "$WANT" ]; } && [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing)$ ]]; then
    # Busy counts as up: restarting would cancel the jobs running now.
    echo "slurm-up: cluster already up (node $NODE $(node_state), accounting=$(has_acct))"; exit 0
fi

if ! dpkg -s $PKGS >/dev/null 2>&1; then
    command -v apt-get >/dev/null || die "$PKGS not all installed and no apt-get to install them"
    # A policy-rc.d that says 101 keeps the packages' scripts from starting services
    # themselves (Docker images ship one; leave theirs in place).
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends $PKGS >/dev/null; } || die "apt-get install $PKGS failed"
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
# Loopback addresses: no reliance on the runner's DNS for its own hostname.
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# A requeued job waits cred_expire+1 s before it may start again (default 120 s): keep tests quick.
AuthInfo=cred_expire=10
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
AccountingStorageType=accounting_storage/$([ "$ACCT" = 1 ] && echo slurmdbd || echo none)
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Lets 'scontrol requeue' and submitit's checkpoint/requeue put jobs back in the queue.
JobRequeue=1
# Trust slurm.conf over what slurmd detects, and bring the node back by itself after a restart.
SlurmdParameters=config_overrides
ReturnToService=2
# Full scheduling pass every 2 s, not 60: a requeued job starts again as soon as it may.
SchedulerParameters=sched_interval=2
# SIGKILL 5 s after the SIGTERM of a cancel/requeue (default 30 s), so tests wait less.
KillWait=5
# Refuse at sbatch time a job that can never fit (e.g. more CPUs than this node), instead of
# leaving it PENDING (PartitionConfig) forever.
EnforcePartLimits=ALL
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

if [ "$ACCT" = 1 ]; then
    # MariaDB on its socket only (root logs in by unix_socket), then slurmdbd, which
    # must know the cluster before slurmctld registers with it.
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
    setsid mariadbd --user=mysql --skip-networking --pid-file=/run/mysqld/mysqld.pid \
        >"$LOG/mariadb.log" 2>&1 </dev/null &
    for _ in $(seq 50); do mariadb -e 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
    mariadb -e 'select 1' >/dev/null 2>&1 || die "mariadbd failed to start (see $LOG/mariadb.log)"
    install -m 600 /dev/stdin /etc/slurm/slurmdbd.conf <<EOF
DbdHost=localhost
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
EOF
    slurmdbd || die "slurmdbd failed to start (see $LOG/slurmdbd.log)"
    for _ in $(seq 50); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
    sacctmgr -n -P list cluster format=cluster | grep -qx nclayers-ci \
        || sacctmgr -i add cluster nclayers-ci >/dev/null || die "sacctmgr cannot reach slurmdbd"
fi

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
for i in $(seq 60); do
    if [ "$i" -gt 3 ]; then  # a daemon that died (port taken, bad config) will not come back
        alive /run/slurmctld.pid || die "slurmctld exited: $(tail -n1 "$LOG/slurmctld.log")"
        alive /run/slurmd.pid || die "slurmd exited: $(tail -n1 "$LOG/slurmd.log")"
    fi
    state=$(node_state || true)
    registered || state="unregistered"
    case "$state" in
        idle) echo "slurm-up: cluster up: node $NODE idle in partition debug ($(nproc) CPUs, ${MEM_MB} MB, accounting=$ACCT)"; exit 0 ;;
        down*|drain*|fail*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
done
die "node $NODE not idle after 60 s (state '${state:-none}'); see $LOG/slurmctld.log and $LOG/slurmd.log"
