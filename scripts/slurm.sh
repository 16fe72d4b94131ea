#!/usr/bin/env bash
# A one-node Slurm on this machine (Debian's slurmctld + slurmd + munge), for the study's real-scheduler tests
# and for trying `alf reproduce --executor slurm` locally. Idempotent; needs root.
#   scripts/slurm.sh start    install if missing, write the config, start munged, slurmctld, slurmd; wait for idle
#   scripts/slurm.sh stop     stop the daemons (installed packages and state stay)
#   scripts/slurm.sh status   one line: running or not
set -euo pipefail
CONF=/etc/slurm/slurm.conf
RUN=/run/slurm-alf
cmd=${1:-start}

running() { sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mix|alloc'; }

case "$cmd" in
status)
  if command -v sinfo >/dev/null && running; then echo "slurm: running ($(sinfo -h -o '%P %D %T' | head -1))"
  else echo "slurm: not running"; exit 1; fi ;;
stop)
  for d in slurmd slurmctld; do pkill -x "$d" 2>/dev/null || true; done
  pkill -x munged 2>/dev/null || true
  echo "slurm: stopped" ;;
start)
  [ "$(id -u)" = 0 ] || { echo "scripts/slurm.sh start needs root (apt install and daemons)" >&2; exit 1; }
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    echo "slurm: installing slurmctld slurmd slurm-client munge (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  fi
  mkdir -p /etc/slurm /var/lib/slurm-alf/ctld /var/lib/slurm-alf/d /var/log/slurm-alf "$RUN" /run/munge
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 88 / 100 ))
  cat > "$CONF.new" <<CONF
# written by alfcache scripts/slurm.sh: one node, this machine
ClusterName=alf
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued task (time limit, preemption) may start again after this many seconds (default 120)
AuthInfo=cred_expire=20
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/lib/slurm-alf/ctld
SlurmdSpoolDir=/var/lib/slurm-alf/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=/var/log/slurm-alf/slurmctld.log
SlurmdLogFile=/var/log/slurm-alf/slurmd.log
# a cancelled task gets SIGTERM, then SIGKILL this many seconds later
KillWait=5
MinJobAge=300
# look for startable jobs (a requeued one, say) every 5 s instead of every 60 s
SchedulerParameters=sched_interval=5
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
  changed=1; cmp -s "$CONF.new" "$CONF" && changed=0
  mv "$CONF.new" "$CONF"
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
  if [ "$changed" = 1 ]; then  # a new config: restart both daemons (jobs and their state survive)
    pkill -x slurmd 2>/dev/null || true; pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 40); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 0.25; done
  fi
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 60); do running && break; sleep 0.5; done
  running || { echo "slurm: did not become idle; see /var/log/slurm-alf/*.log" >&2; exit 1; }
  scontrol update nodename=localhost state=resume 2>/dev/null || true
  echo "slurm: running ($(sinfo -h -o '%P %D %T' | head -1))" ;;
*) echo "usage: scripts/slurm.sh start|stop|status" >&2; exit 2 ;;
esac
