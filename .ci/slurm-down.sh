#!/usr/bin/env bash
# Stops the one-node cluster started by .ci/slurm-up.sh (no systemd, so by pid files).
# Leaves packages, key, config and state in place: slurm-up.sh then only restarts daemons.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "slurm-down: needs root" >&2; exit 1; }

stop() {  # $1 pid file. TERM first so state is saved; KILL after 15 s (slurmd can hang
          # on SIGTERM for a long time retrying a controller that is already gone).
    local pid
    [ -s "$1" ] || return 0
    pid=$(cat "$1")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}

# Jobs outlive slurmd (each slurmstepd carries on alone): cancel them while the controller is up.
if [ -s /run/slurmctld.pid ] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null; then
    squeue -h -o %A 2>/dev/null | xargs -r scancel 2>/dev/null || true
    for _ in $(seq 30); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
fi

# munged last: the other daemons authenticate through it until they are gone.
stop /run/slurmd.pid
stop /run/slurmctld.pid
stop /run/slurmdbd.pid            # these two only with SLURM_ACCOUNTING=1
stop /run/mysqld/mysqld.pid
stop /run/munge/munged.pid
echo "slurm-down: daemons stopped"
