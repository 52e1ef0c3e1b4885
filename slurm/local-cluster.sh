#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests and for trying things out.
#
#   slurm/local-cluster.sh start DIR    # as root; prints the SLURM_CONF to export
#   slurm/local-cluster.sh stop DIR     # cancels its jobs, stops exactly what start started
#
# Everything lives under DIR (configs, state, logs, pid files, MariaDB's data) but for
# munged's private socket folder in /tmp (munged runs as user munge, which may not be able
# to enter DIR), so a system SLURM or munge on the same machine is never touched.
# Accounting (MariaDB + slurmdbd) is part of it because submitit only polls sacct: without
# it, a job that dies without a result is never noticed.
# Needs (Debian/Ubuntu): slurm-wlm munge slurmdbd mariadb-server.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
run=$dir/run
export SLURM_CONF=$dir/slurm.conf
munge_dir_record=$run/munge-dir

free_ports() {  # free_ports N: N distinct free TCP ports (all held open until printed)
  python3 -c 'import socket, sys
held = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in held: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in held))' "$1"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  while ((SECONDS < deadline)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "local-cluster: $what did not come up in time; see $dir/log" >&2
  return 1
}

start_munge() {
  munge_dir=$(mktemp -d /tmp/landscape-munge.XXXXXX)
  echo "$munge_dir" >"$munge_dir_record"
  chmod 755 "$munge_dir" && chown munge: "$munge_dir"
  runuser -u munge -- munged --socket="$munge_dir/munge.socket" \
    --pid-file="$munge_dir/munged.pid" --log-file="$munge_dir/munged.log" \
    --seed-file="$munge_dir/munged.seed"
  wait_for 10 munged test -S "$munge_dir/munge.socket"
}

start_mariadb() {
  local port=$1
  mariadb-install-db --user=root --datadir="$dir/mysql" --auth-root-authentication-method=normal \
    >"$dir/log/mariadb-install.log" 2>&1
  mariadbd --user=root --datadir="$dir/mysql" --socket="$run/mysql.sock" --port="$port" \
    --bind-address=127.0.0.1 --pid-file="$run/mariadb.pid" --log-error="$dir/log/mariadb.log" &
  wait_for 30 MariaDB mariadb --socket="$run/mysql.sock" -u root -e 'SELECT 1'
  mariadb --socket="$run/mysql.sock" -u root <<'SQL'
CREATE USER 'slurm'@'localhost' IDENTIFIED BY 'slurm';
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
}

write_configs() {
  local db_port=$1 dbd_port=$2 ctld_port=$3 d_port=$4 auth="socket=$munge_dir/munge.socket"
  cat >"$dir/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=$auth
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort=$dbd_port
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$run/slurmdbd.pid
LogFile=$dir/log/slurmdbd.log
EOF
  chmod 600 "$dir/slurmdbd.conf"
  cat >"$SLURM_CONF" <<EOF
ClusterName=landscape
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
AuthType=auth/munge
AuthInfo=$auth
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$run/slurmctld.pid
SlurmdPidFile=$run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmix
ReturnToService=2
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
AccountingStoragePass=$munge_dir/munge.socket
JobAcctGatherType=jobacct_gather/linux
$(slurmd -C | head -n 1) NodeAddr=127.0.0.1
PartitionName=local Nodes=$(hostname) Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  [ "$(id -u)" = 0 ] || { echo "local-cluster: start needs root" >&2; exit 1; }
  [ ! -e "$run/slurmctld.pid" ] || { echo "local-cluster: already started in $dir" >&2; exit 1; }
  mkdir -p "$dir"/{state,spool,log,mysql} "$run"
  local db_port dbd_port ctld_port d_port
  read -r db_port dbd_port ctld_port d_port < <(free_ports 4)
  trap 'echo "local-cluster: start failed; stopping what it started" >&2; stop' EXIT
  start_munge
  start_mariadb "$db_port"
  write_configs "$db_port" "$dbd_port" "$ctld_port" "$d_port"
  slurmdbd
  wait_for 30 slurmdbd sacctmgr -i show cluster
  slurmctld
  slurmd
  wait_for 60 "the node" sh -c 'sinfo -h -o %t | grep -qx idle'
  trap - EXIT
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pid_file() {  # stop_pid_file FILE: SIGTERM, then wait (a zombie counts as stopped)
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    [ -d "/proc/$pid" ] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$file"
}

stop_step_daemons() {  # slurmstepd ignores SIGTERM: kill those of this cluster only
  local pid
  for pid in $(pgrep -x slurmstepd || true); do
    if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$SLURM_CONF"; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
}

stop() {
  if [ -f "$run/slurmctld.pid" ]; then
    scancel --full --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 100); do
      [ -z "$(squeue -h 2>/dev/null)" ] && break
      sleep 0.1
    done
  fi
  stop_pid_file "$run/slurmd.pid"
  stop_step_daemons
  stop_pid_file "$run/slurmctld.pid"
  stop_pid_file "$run/slurmdbd.pid"
  stop_pid_file "$run/mariadb.pid"
  if [ -f "$munge_dir_record" ]; then
    munge_dir=$(cat "$munge_dir_record")
    stop_pid_file "$munge_dir/munged.pid"
    rm -rf "$munge_dir" "$munge_dir_record"
  fi
}

case $action in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
