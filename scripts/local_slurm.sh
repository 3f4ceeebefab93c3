#!/usr/bin/env bash
# A real two-node Slurm cluster (nodes n1, n2; partition "debug"; 8 fake GPUs per
# node; slurmdbd accounting on MariaDB) on this one host, for development and tests.
# Debian 12, run as root, no systemd needed.
#
# Usage: scripts/local_slurm.sh start|stop|status
#   start   install packages if missing, write configs, start every daemon that is
#           not running and wait until both nodes are usable (idempotent)
#   stop    stop both slurmd, slurmctld, slurmdbd, MariaDB and munge
#   status  print sinfo; exit 0 only when both nodes are idle/usable
#
# Environment: LOCAL_SLURM_TIMEOUT  seconds to wait for each daemon (default 60)
set -euo pipefail

CLUSTER=localcluster
PARTITION=debug
ACCOUNT=local
NODES=(n1 n2)
declare -A PORT=([n1]=17001 [n2]=17002)
CPUS=16
MEM_MB=10000
GPUS=8
HOST=$(hostname -s)
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}

ETC=/etc/slurm
LOG=/var/log/slurm
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=slurmdbd-local # MariaDB account reachable from localhost only
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)

log() { echo "local_slurm: $*" >&2; }

die() { # die MESSAGE [LOGFILE...]
  log "ERROR: $1"
  shift
  local f
  for f in "$@"; do
    if [[ -f $f ]]; then
      echo "----- tail -n 30 $f" >&2
      tail -n 30 "$f" >&2
    fi
  done
  exit 1
}

# wait_for WHAT LOGFILE CMD...: poll CMD until it succeeds, at most $TIMEOUT s.
wait_for() {
  local what=$1 logfile=$2 deadline=$((SECONDS + TIMEOUT))
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${TIMEOUT}s waiting for $what" "$logfile"
    sleep 0.5
  done
}

# running NAME PIDFILE: the pid file names a live process called NAME.
running() {
  local pid
  pid=$(cat "$2" 2>/dev/null) || return 1
  [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]]
}

# stop_pid NAME PIDFILE: SIGTERM, wait, SIGKILL after 30 s.
stop_pid() {
  local name=$1 pidfile=$2 pid deadline=$((SECONDS + 30))
  running "$name" "$pidfile" || return 0
  pid=$(cat "$pidfile")
  log "stopping $name (pid $pid)"
  kill "$pid" 2>/dev/null || true
  while running "$name" "$pidfile"; do
    if ((SECONDS >= deadline)); then
      log "$name did not exit within 30s; killing it"
      kill -9 "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
  rm -f "$pidfile"
}

CONFIG_CHANGED=0
# put_file PATH MODE < CONTENT: replace PATH only if the content differs.
put_file() {
  local path=$1 mode=$2 tmp
  tmp=$(mktemp)
  cat >"$tmp"
  if cmp -s "$tmp" "$path"; then
    rm -f "$tmp"
    return 0
  fi
  install -m "$mode" -o root -g root "$tmp" "$path"
  rm -f "$tmp"
  CONFIG_CHANGED=1
  log "wrote $path"
}

# ---------------------------------------------------------------- packages

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]}"
  # Keep the packages' postinst from starting daemons with their stock
  # configs; this script starts them itself.
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  if ((own_policy)); then
    rm -f "$policy"
    trap - EXIT
  fi
}

# ---------------------------------------------------------------- configs

slurm_conf() {
  cat <<EOF
# Written by scripts/local_slurm.sh; overwritten on its next start.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Short credential lifetime: a requeued job may start again after 10 s, not 120 s.
AuthInfo=cred_expire=10
MailProg=/bin/true

StateSaveLocation=$STATE
SlurmctldPidFile=/run/slurmctld.pid
SlurmctldLogFile=$LOG/slurmctld.log
# Both slurmd run on this host, so each needs its own pid file (with a shared
# one the second kills the first), spool directory and log.
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdSpoolDir=$SPOOL/%n
SlurmdLogFile=$LOG/slurmd-%n.log
# Nodes register with the CPUs/memory/GPUs below, not this machine's.
SlurmdParameters=config_overrides

# No cgroups here.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((MEM_MB / CPUS))
GresTypes=gpu

SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5
KillWait=5
ReturnToService=2
JobRequeue=1
DependencyParameters=kill_invalid_depend

AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none

EOF
  local n
  for n in "${NODES[@]}"; do
    echo "NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=${PORT[$n]} CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN"
  done
  echo "PartitionName=$PARTITION Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP"
}

gres_conf() {
  # GPUs need a File= or slurmd drops them and the nodes drain; the files
  # are symlinks to /dev/null (see make_fake_gpus).
  echo "NodeName=n[1-2] Name=gpu File=/dev/fakegpu[0-$((GPUS - 1))]"
}

slurmdbd_conf() {
  cat <<EOF
# Written by scripts/local_slurm.sh; overwritten on its next start.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
}

write_configs() {
  mkdir -p "$ETC" "$LOG" "$STATE"
  local n
  for n in "${NODES[@]}"; do mkdir -p "$SPOOL/$n"; done
  # Redirections, not pipes: put_file must run in this shell to set CONFIG_CHANGED.
  put_file "$ETC/slurm.conf" 644 < <(slurm_conf)
  put_file "$ETC/gres.conf" 644 < <(gres_conf)
  put_file "$ETC/slurmdbd.conf" 600 < <(slurmdbd_conf) # slurmdbd insists on 600, owned by SlurmUser
}

make_fake_gpus() {
  local i
  for ((i = 0; i < GPUS; i++)); do
    [[ -L /dev/fakegpu$i ]] || ln -sfn /dev/null "/dev/fakegpu$i"
  done
}

# ---------------------------------------------------------------- daemons

munge_ok() { munge -n </dev/null | unmunge >/dev/null; }
mariadb_ok() { mariadb-admin ping; }
slurmdbd_ok() { sacctmgr -n list cluster; }
slurmctld_ok() { scontrol ping | grep -q 'is UP'; }

start_munge() {
  munge_ok 2>/dev/null && return 0
  if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 600 /etc/munge/munge.key
  fi
  log "starting munge"
  # Daemon output goes to a file, never to our stdout: a caller piping this
  # script (| tee) would otherwise wait for the daemon to exit.
  service munge start </dev/null >>"$LOG/service-munge.log" 2>&1 ||
    die "service munge start failed" "$LOG/service-munge.log" /var/log/munge/munged.log
  wait_for munge /var/log/munge/munged.log munge_ok
}

start_mariadb() {
  mariadb_ok >/dev/null 2>&1 && return 0
  log "starting MariaDB"
  # its own session: mysqld_safe must outlive the shell (and process group) that started it
  setsid service mariadb start </dev/null >>"$LOG/service-mariadb.log" 2>&1 ||
    die "service mariadb start failed" "$LOG/service-mariadb.log"
  wait_for MariaDB "$LOG/service-mariadb.log" mariadb_ok
}

setup_database() {
  mariadb <<EOF
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
EOF
}

start_slurmdbd() {
  running slurmdbd /run/slurmdbd.pid && return 0
  setup_database
  log "starting slurmdbd"
  slurmdbd </dev/null >>"$LOG/slurmdbd.log" 2>&1 || die "slurmdbd failed to start" "$LOG/slurmdbd.log"
  wait_for slurmdbd "$LOG/slurmdbd.log" slurmdbd_ok
}

# sacctmgr -i add fails on what already exists, hence the checks.
setup_accounting() {
  [[ -n $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster) ]] ||
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  [[ -n $(sacctmgr -n -P list account "$ACCOUNT" format=account) ]] ||
    sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="local jobs" organization=local >/dev/null
  [[ -n $(sacctmgr -n -P list assoc user=root account="$ACCOUNT" cluster="$CLUSTER" format=user) ]] ||
    sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
}

start_slurmctld() {
  running slurmctld /run/slurmctld.pid && return 0
  log "starting slurmctld"
  slurmctld </dev/null >>"$LOG/slurmctld.log" 2>&1 || die "slurmctld failed to start" "$LOG/slurmctld.log"
  wait_for slurmctld "$LOG/slurmctld.log" slurmctld_ok
}

start_slurmd() {
  local n=$1
  running slurmd "/run/slurmd-$n.pid" && return 0
  log "starting slurmd $n"
  slurmd -N "$n" </dev/null >>"$LOG/slurmd-$n.log" 2>&1 || die "slurmd $n failed to start" "$LOG/slurmd-$n.log"
}

# node_states: "NAME STATE" per node, e.g. "n1 idle", "n2 drain", "n2 down*".
node_states() { sinfo -h -N -p "$PARTITION" -o '%N %t' | sort -u; }

usable() { [[ $1 =~ ^(idle|mix|alloc|comp)$ ]]; }

all_nodes_usable() {
  local states n s count=0
  states=$(node_states) || return 1
  while read -r n s; do
    usable "$s" || return 1
    count=$((count + 1))
  done <<<"$states"
  ((count == ${#NODES[@]}))
}

# Resume nodes that a previous run left drained or down, and wait for both.
wait_for_nodes() {
  local deadline=$((SECONDS + TIMEOUT)) n s
  until all_nodes_usable; do
    if ((SECONDS >= deadline)); then
      sinfo -N -l >&2 || true
      scontrol show node >&2 || true
      die "timed out after ${TIMEOUT}s waiting for nodes ${NODES[*]} to become idle" \
        "$LOG/slurmctld.log" "$LOG/slurmd-n1.log" "$LOG/slurmd-n2.log"
    fi
    while read -r n s; do
      if [[ $s =~ ^(drain|drng|down|fail|failg)$ ]]; then
        log "node $n is $s; resuming it"
        scontrol update nodename="$n" state=resume || true
      fi
    done < <(node_states 2>/dev/null || true)
    sleep 0.5
  done
}

stop_slurm() {
  local n
  for n in "${NODES[@]}"; do stop_pid slurmd "/run/slurmd-$n.pid"; done
  stop_pid slurmctld /run/slurmctld.pid
  stop_pid slurmdbd /run/slurmdbd.pid
}

# ---------------------------------------------------------------- commands

cmd_start() {
  local t0=$SECONDS n
  install_packages
  write_configs
  make_fake_gpus
  if ((CONFIG_CHANGED)); then
    log "configuration changed; (re)starting the Slurm daemons"
    stop_slurm
  fi
  start_munge
  start_mariadb
  start_slurmdbd
  setup_accounting
  start_slurmctld
  for n in "${NODES[@]}"; do start_slurmd "$n"; done
  wait_for_nodes
  sinfo
  log "cluster $CLUSTER is up ($((SECONDS - t0))s)"
}

cmd_stop() {
  stop_slurm
  if mariadb_ok >/dev/null 2>&1; then
    log "stopping MariaDB"
    service mariadb stop </dev/null >>"$LOG/service-mariadb.log" 2>&1 ||
      die "service mariadb stop failed" "$LOG/service-mariadb.log"
  fi
  if munge_ok 2>/dev/null; then
    log "stopping munge"
    service munge stop </dev/null >>"$LOG/service-munge.log" 2>&1 ||
      die "service munge stop failed" "$LOG/service-munge.log"
  fi
  log "stopped"
}

cmd_status() {
  local ok=0 n
  if ! running slurmctld /run/slurmctld.pid; then
    log "slurmctld is not running"
    return 1
  fi
  sinfo || return 1
  # slurmctld notices a dead slurmd only after SlurmdTimeout, so look too.
  for n in "${NODES[@]}"; do
    running slurmd "/run/slurmd-$n.pid" || { log "slurmd $n is not running"; ok=1; }
  done
  running slurmdbd /run/slurmdbd.pid || { log "slurmdbd is not running"; ok=1; }
  all_nodes_usable || { log "not all of ${NODES[*]} are idle/usable"; ok=1; }
  return "$ok"
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
  echo "usage: $0 start|stop|status" >&2
  exit 2
  ;;
esac
