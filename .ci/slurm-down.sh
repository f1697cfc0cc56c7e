#!/usr/bin/env bash
# Stops the one-node cluster started by .ci/slurm-up.sh (no systemd, so by pid files).
# Leaves packages, key and config in place: slurm-up.sh then only restarts the daemons.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "slurm-down: needs root" >&2; exit 1; }

stop() {  # $1 name, $2 pid file: TERM, then wait up to 10 s for it to go
    local pid
    [ -s "$2" ] || return 0
    pid=$(cat "$2")
    kill -0 "$pid" 2>/dev/null || { rm -f "$2"; return 0; }
    kill "$pid"
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && { echo "slurm-down: $1 ($pid) did not stop" >&2; return 1; }
    rm -f "$2"
}

# slurmd first: it kills the jobs it still runs, then the controller goes.
stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
# munged last: slurmd and slurmctld authenticate through it while they shut down.
stop munged /run/munge/munged.pid
echo "slurm-down: daemons stopped"
