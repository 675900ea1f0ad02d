#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for the tests (`.ci/run` uses it; as root you can too).
# `up` installs packages (apt-get), starts daemons and may add lines to /etc/hosts: tests/test_slurm.py runs it
# only with FMNIST_DIST_SLURM_SETUP=1, and otherwise uses a cluster that is up or skips.
#   .ci/slurm-cluster.sh up       # install SLURM and MUNGE if missing, start them, wait until both nodes are idle
#   .ci/slurm-cluster.sh status   # exit 0 when both nodes answer, 1 otherwise
#   .ci/slurm-cluster.sh down     # cancel every job, stop every daemon it started, remove everything it wrote
#   export SLURM_CONF=/tmp/fmnist-dist-slurm/slurm.conf   # then sbatch, squeue, sinfo, scontrol use this cluster
#
# Debian's packages (slurmctld slurmd slurm-client munge; SLURM 22.05) run as root with no systemd and no
# cgroups: one munged on its own socket, one slurmctld, and two slurmd (`-N n1`, `-N n2`; Debian builds SLURM
# with multiple-slurmd support) with their own port, spool, pid and log, both at 127.0.0.1.
# Environment: FMNIST_DIST_SLURM_DIR (default /tmp/fmnist-dist-slurm) holds every file it writes;
# FMNIST_DIST_SLURM_PORT (default 30817) is slurmctld's port, and the nodes use the next two.
# `up` is idempotent. The names n1 and n2 (and this machine's hostname) must resolve, because jobs rendezvous on
# the first node's name: `up` adds the /etc/hosts lines it needs, tagged, and `down` removes only those.
set -euo pipefail

DIR=${FMNIST_DIST_SLURM_DIR:-/tmp/fmnist-dist-slurm}
PORT=${FMNIST_DIST_SLURM_PORT:-30817}
NODES=(n1 n2)
PACKAGES=(slurmctld slurmd slurm-client munge)
HOSTS_TAG="# added by fmnist-dist .ci/slurm-cluster.sh"
export SLURM_CONF=$DIR/slurm.conf

die() { echo "slurm-cluster: $*" >&2; exit 1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return
    [[ $(id -u) == 0 ]] || die "SLURM is not installed and installing it needs root: apt-get install ${PACKAGES[*]}"
    command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get to install ${PACKAGES[*]}"
    echo "slurm-cluster: installing ${PACKAGES[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

# Lines for names that do not resolve yet; a name that resolves elsewhere is an error (jobs would go there).
add_host_entries() {
    local name address missing=()
    for name in "$(hostname)" "${NODES[@]}"; do
        if address=$(getent hosts "$name"); then
            address=${address%% *}
            [[ $name == "$(hostname)" || $address == 127.* || $address == ::1 ]] \
                || die "$name resolves to $address, not to this machine; remove it from /etc/hosts or DNS first"
        else
            missing+=("$name")
        fi
    done
    (( ${#missing[@]} == 0 )) || echo "127.0.0.1 ${missing[*]} $HOSTS_TAG" >>/etc/hosts
}

remove_host_entries() {
    grep -qF "$HOSTS_TAG" /etc/hosts || return 0
    local kept
    kept=$(grep -vF "$HOSTS_TAG" /etc/hosts || true)
    # Rewrite in place rather than rename: /etc/hosts is often a bind mount in containers.
    printf '%s\n' "$kept" >/etc/hosts
}

write_config() {
    local host
    host=$(hostname)
    mkdir -p "$DIR/state" "${NODES[@]/#/$DIR/spool-}"
    chmod 700 "$DIR"
    : >"$DIR/plugstack.conf"  # no SPANK plugins, whatever /etc/slurm holds
    # Two GPUs per node as empty files: enough for SLURM to allocate them (--gpus-per-node, SLURM_GPUS_ON_NODE),
    # so that the tests can check what launch/slurm.sbatch asks of GPU nodes; nothing ever opens them.
    touch "$DIR/gpu0" "$DIR/gpu1"
    echo "Name=gpu File=$DIR/gpu[0-1]" >"$DIR/gres.conf"
    cat >"$SLURM_CONF" <<EOF
# Written by .ci/slurm-cluster.sh; removed by \`.ci/slurm-cluster.sh down\`.
ClusterName=fmnist-dist-ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job waits this long before it starts again (default 120 s).
AuthInfo=socket=$DIR/munge.socket,cred_expire=10
PlugStackConfig=$DIR/plugstack.conf
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdSpoolDir=$DIR/spool-%n
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmdLogFile=$DIR/slurmd-%n.log
# No cgroups in CI containers: track processes by parent pid, bind nothing, account nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
GresTypes=gpu
# Each node declares 4 CPUs whatever this machine has, so that the tests can ask for several per task.
SlurmdParameters=config_overrides
ReturnToService=2
# Finished jobs leave the controller after 5 s, so that \`sbatch --wait\` notices within seconds; a job that
# becomes eligible (a requeued one, once cred_expire has passed) starts within a second, not on the next 60 s pass.
MinJobAge=5
SchedulerParameters=sched_interval=1
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 1)) CPUs=4 Gres=gpu:2 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 2)) CPUs=4 Gres=gpu:2 State=UNKNOWN
PartitionName=ci Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

start_daemons() {
    dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge.key"
    # --force: munged refuses to run as root otherwise.
    munged --force --socket="$DIR/munge.socket" --key-file="$DIR/munge.key" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed"
    slurmctld -f "$SLURM_CONF"
    local node
    for node in "${NODES[@]}"; do
        slurmd -f "$SLURM_CONF" -N "$node"
    done
}

# Whether every node's state (sinfo's short form) matches the regular expression $1. A trailing * (idle*,
# down*) means the node does not answer, so it never matches.
nodes_in_state() {
    local states node
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    for node in "${NODES[@]}"; do
        grep -Eq "^$node ($1)\$" <<<"$states" || return 1
    done
}

wait_until_idle() {
    local i
    for ((i = 0; i < 60; i++)); do
        nodes_in_state idle && return
        sleep 0.5
    done
    echo "--- sinfo:" >&2; sinfo -N >&2 || true
    tail -n 5 "$DIR"/*.log >&2 || true
    die "the nodes did not become idle within 30 s (logs above, all under $DIR)"
}

# Stop the daemon whose pid file is $1 and wait for it to exit.
stop_pidfile() {
    local pid i
    [[ -f $1 ]] || return 0
    pid=$(<"$1")
    kill "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

cancel_jobs() {
    [[ -f $SLURM_CONF ]] && squeue -h >/dev/null 2>&1 || return 0
    scancel --partition=ci 2>/dev/null || true
    # Stopping slurmd would not stop running job steps: wait for the jobs to end first.
    local i
    for ((i = 0; i < 60; i++)); do
        [[ -z $(squeue -h -o %i 2>/dev/null) ]] && return
        sleep 0.5
    done
    echo "slurm-cluster: warning: jobs still running after 30 s: $(squeue -h -o %i | tr '\n' ' ')" >&2
}

up() {
    if status >/dev/null 2>&1; then
        echo "slurm-cluster: already up (SLURM_CONF=$SLURM_CONF)"
        return
    fi
    [[ $(id -u) == 0 ]] || die "needs root (the daemons run as root, and n1/n2 may need /etc/hosts entries)"
    [[ ! -e $DIR ]] || down  # leftovers of a cluster that died: start clean
    install_packages
    add_host_entries
    write_config
    start_daemons
    wait_until_idle
    echo "slurm-cluster: up, nodes n1 n2 idle; export SLURM_CONF=$SLURM_CONF"
}

down() {
    [[ ! -e $DIR || $(id -u) == 0 ]] || die "needs root (the cluster's daemons run as root)"
    cancel_jobs
    local node
    for node in "${NODES[@]}"; do
        stop_pidfile "$DIR/slurmd-$node.pid"
    done
    stop_pidfile "$DIR/slurmctld.pid"
    stop_pidfile "$DIR/munged.pid"
    [[ $(id -u) != 0 ]] || remove_host_entries
    rm -rf "$DIR"
    echo "slurm-cluster: down"
}

status() {
    [[ -f $SLURM_CONF ]] || { echo "slurm-cluster: not up (no $SLURM_CONF)"; return 1; }
    sinfo -N -o '%N %t' || return 1
    nodes_in_state 'idle|alloc|mix|comp'
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
