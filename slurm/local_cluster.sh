#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (for tests and for trying the scripts), as root:
#
#     bash slurm/local_cluster.sh          # install (Debian/Ubuntu) if needed, start munged, slurmctld, slurmd
#     sinfo                                # -> the partition "debug" with this host idle
#     bash slurm/local_cluster.sh stop     # stop the three daemons it started (state stays in /var/spool)
#
# Idempotent: when `sinfo` already answers with a usable node it does nothing (so it never touches a real cluster).
# Installs the Debian packages slurmctld, slurmd, slurm-client and munge with apt-get when `sbatch` is missing.
# The node has every CPU of the machine (`nproc`) and lets tasks share CPUs (OverSubscribe=FORCE) so that a 2-task
# job fits on a 2-core machine. No accounting daemon: use `squeue` / `scontrol show job` (kept 300 s after the end)
# instead of `sacct`. Logs: /var/log/slurm/{slurmctld,slurmd}.log. Exit code 0 when the cluster answers, 1 otherwise
# (the last lines say why).
set -uo pipefail

log() { echo "local_cluster: $*" >&2; }
fail() { log "$*"; exit 1; }

cluster_up() {   # a node that is idle, mixed or allocated (not down / drained)
    command -v sinfo >/dev/null && timeout 10 sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'
}

if [ "${1:-}" = stop ]; then
    for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
        [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null && log "stopped $(basename "$pidfile" .pid)"
    done
    exit 0
fi
if cluster_up; then
    exit 0
fi
[ "$(id -u)" = 0 ] || fail "not root, so slurmctld/slurmd cannot be started here; run as root or use a real cluster."

# ---- install ------------------------------------------------------------------------------------------------------
if ! command -v sbatch >/dev/null || ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || fail "SLURM is not installed and apt-get is missing; install slurmctld, slurmd, slurm-client and munge."
    log "installing slurmctld slurmd slurm-client munge with apt-get (one time, about a minute)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || fail "apt-get update failed (no package registry reachable?)."
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || fail "apt-get install slurmctld slurmd slurm-client munge failed."
fi

# ---- munge (authentication between the SLURM daemons and clients) ---------------------------------------------------
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
    else create-munge-key -f; fi || fail "could not create /etc/munge/munge.key."
fi
if id munge >/dev/null 2>&1; then
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
fi
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key && chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if id munge >/dev/null 2>&1; then
        su -s /bin/sh munge -c munged || fail "munged did not start (see /var/log/munge/munged.log)."
    else
        munged --force || fail "munged did not start (see /var/log/munge/munged.log)."
    fi
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null 2>&1 || fail "munged runs but a credential does not round-trip (munge -n | unmunge)."
fi

# ---- slurm.conf ----------------------------------------------------------------------------------------------------
HOST=$(hostname -s)
CPUS=$(nproc)
CONF_DIR=/etc/slurm
[ -d /etc/slurm-llnl ] && [ ! -d /etc/slurm ] && CONF_DIR=/etc/slurm-llnl
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > "$CONF_DIR/slurm.conf" <<EOF
# Written by dit_scale slurm/local_cluster.sh: one node ($HOST), one partition, no accounting, no cgroups.
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120): 10 keeps tests short.
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2   # start eligible jobs within seconds (one small node)
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
ReturnToService=2
SlurmdTimeout=300
MinJobAge=300
KillWait=30
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
EOF

# ---- daemons -------------------------------------------------------------------------------------------------------
pgrep -x slurmctld >/dev/null || slurmctld || fail "slurmctld did not start (see /var/log/slurm/slurmctld.log)."
pgrep -x slurmd >/dev/null || slurmd || fail "slurmd did not start (see /var/log/slurm/slurmd.log)."
for _ in $(seq 60); do
    cluster_up && { log "up: node $HOST with $CPUS CPUs, partition debug"; exit 0; }
    # a node left down/drained by an earlier start comes back
    timeout 10 scontrol update nodename="$HOST" state=resume >/dev/null 2>&1
    sleep 1
done
tail -n 5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2
fail "slurmctld and slurmd started but sinfo shows no usable node after 60 s."
