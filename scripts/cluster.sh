#!/usr/bin/env bash
# A real three-node RabbitMQ cluster on this machine, beside the system's own node (rabbit@localhost),
# for the cluster tests, the chaos run and the benchmark.
#   scripts/cluster.sh up [--install]   start multillm-1@localhost, multillm-2@localhost and multillm-3@localhost,
#                                       clustered; install Debian's rabbitmq-server first when missing and
#                                       --install is given; prints the time it took and the AMQP URLs (kombu's
#                                       failover form, joined by ';'). Already up and whole: says so, exits 0.
#                                       Anything else left over from an earlier run is killed and wiped first.
#   scripts/cluster.sh down             stop the three nodes, remove the base folder
#   scripts/cluster.sh status           cluster_status from the first node that answers; exit 1 unless whole
# and for multillm/testbed/cluster.py (N: 1, 2, 3 or a node name):
#   scripts/cluster.sh kill N           SIGKILL of node N's Erlang VM
#   scripts/cluster.sh start-node N...  start nodes again on their data (after a kill); waits until the
#                                       cluster is whole again
#   scripts/cluster.sh ctl N ARGS...    rabbitmqctl -q ARGS against node N, as the rabbitmq user
#
#   MULTILLM_CLUSTER_PORTS       AMQP ports, one a node (default "5681 5682 5683"; commas work too)
#   MULTILLM_CLUSTER_DIST_PORTS  Erlang distribution ports (default: each AMQP port + 20000)
#   MULTILLM_CLUSTER_BASE        every node's data, logs and config (default /tmp/multillm-cluster)
#
# The nodes run as the rabbitmq user with HOME=/var/lib/rabbitmq, and so does every rabbitmqctl here:
# that is where the system's Erlang cookie lives, which the three nodes share (root's own
# ~/.erlang.cookie, if any, is another cookie). They use no plugins at all (an empty enabled_plugins
# file): the management plugin would try to bind port 15672, which the system node may hold.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then exec sudo --preserve-env=MULTILLM_CLUSTER_PORTS,MULTILLM_CLUSTER_DIST_PORTS,MULTILLM_CLUSTER_BASE bash "$0" "$@"; fi

command=${1:?usage: cluster.sh up|down|status [--install] | kill N | start-node N... | ctl N ARGS...}
shift
BASE=${MULTILLM_CLUSTER_BASE:-/tmp/multillm-cluster}
case $BASE in /?*/?*) ;; *) echo "cluster.sh: MULTILLM_CLUSTER_BASE=$BASE is removed on down: give a folder of its own" >&2; exit 2 ;; esac
read -r -a PORTS <<<"${MULTILLM_CLUSTER_PORTS:-5681 5682 5683}"
[ "${#PORTS[@]}" = 1 ] && IFS=, read -r -a PORTS <<<"${PORTS[0]}"
if [ -n "${MULTILLM_CLUSTER_DIST_PORTS:-}" ]; then
  read -r -a DIST_PORTS <<<"${MULTILLM_CLUSTER_DIST_PORTS//,/ }"
else
  DIST_PORTS=()
  for port in "${PORTS[@]}"; do DIST_PORTS+=($((port + 20000))); done
fi
[ "${#PORTS[@]}" = 3 ] && [ "${#DIST_PORTS[@]}" = 3 ] || { echo "cluster.sh: three AMQP and three distribution ports, please" >&2; exit 2; }
NODES=(1 2 3)
SBIN=/usr/lib/rabbitmq/bin # the scripts themselves: /usr/sbin's wrapper sends the server's output to the system node's startup_log
RABBIT_HOME=/var/lib/rabbitmq
# Erlang distribution on the loopback only, like the system node (/etc/rabbitmq/rabbitmq-env.conf).
LOOPBACK_ONLY='-kernel inet_dist_use_interface {127,0,0,1}'

name_of() { echo "multillm-$1@localhost"; }
dir_of() { echo "$BASE/multillm-$1"; }
now() { echo "${EPOCHREALTIME/,/.}"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Run a command as the rabbitmq user, with its home (and so its Erlang cookie). The CLI tools get a
# distribution port range of their own: the default 35672..35682 is shared with every rabbitmqctl
# run against the system node, and eleven ports run out when the tests call both at once.
as_rabbitmq() {
  (cd "$RABBIT_HOME" && runuser -u rabbitmq -- env HOME="$RABBIT_HOME" ERL_EPMD_ADDRESS=127.0.0.1 \
    ERL_FLAGS="$LOOPBACK_ONLY" RABBITMQ_CONF_ENV_FILE=/dev/null \
    RABBITMQ_CTL_DIST_PORT_MIN=35700 RABBITMQ_CTL_DIST_PORT_MAX=35799 "$@")
}

# `ctl N ARGS...`: rabbitmqctl -q -n multillm-N@localhost ARGS...
ctl() {
  local i
  i=$(index_of "$1")
  shift
  as_rabbitmq "$SBIN/rabbitmqctl" -q -n "$(name_of "$i")" "$@"
}

# The OS pids of our nodes' Erlang VMs that still run, of node $1 only when given. Each VM carries
# its RABBITMQ_NODENAME in its environment: a pid file can be stale and its pid reused by now.
beam_pids() {
  local environ pid wanted=${1:-multillm-[0-9]+@localhost}
  for environ in /proc/[0-9]*/environ; do
    pid=${environ#/proc/}
    pid=${pid%/environ}
    case $(readlink "/proc/$pid/exe" 2>/dev/null) in */beam.smp) ;; *) continue ;; esac
    tr '\0' '\n' <"$environ" 2>/dev/null | grep -qxE "RABBITMQ_NODENAME=$wanted" && echo "$pid"
  done
  return 0
}

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Whole: every node's AMQP port answers and node 1 sees all three nodes running.
whole() {
  local i running
  for i in "${NODES[@]}"; do answers "${PORTS[i - 1]}" || return 1; done
  running=$(ctl 1 eval 'lists:sort(rabbit_nodes:all_running()).' 2>/dev/null) || return 1
  [ "$running" = "['multillm-1@localhost','multillm-2@localhost','multillm-3@localhost']" ]
}

write_config() {
  local i=$1 dir
  dir=$(dir_of "$i")
  mkdir -p "$dir/mnesia" "$dir/log"
  : >"$dir/enabled_plugins"
  # Peer discovery (classic_config) rather than `rabbitmqctl join_cluster`: the nodes join while they
  # boot, all three at once, instead of booting alone and then each doing stop_app, join_cluster and
  # start_app (a second boot, and three more CLI runs of a second each). It is also safe here: in 3.10
  # a blank node takes a lock over the listed nodes before it looks for peers, so only one of them can
  # start a new cluster and the others join it in turn. The lock holder keeps the lock while it
  # retries, and the others wait for it: so it retries little (2 x 200 ms) before it starts the
  # cluster alone. (Listing node 1 only deadlocks: 2 and 3 hold the lock waiting for node 1, which
  # waits for the lock. It cost a minute, and the nodes ended up each starting alone.)
  cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:${PORTS[i - 1]}
cluster_name = multillm
cluster_formation.peer_discovery_backend = classic_config
cluster_formation.classic_config.nodes.1 = $(name_of 1)
cluster_formation.classic_config.nodes.2 = $(name_of 2)
cluster_formation.classic_config.nodes.3 = $(name_of 3)
cluster_formation.discovery_retry_limit = 2
cluster_formation.discovery_retry_interval = 200
disk_free_limit.absolute = 50MB
log.console = false
log.file.level = info
EOF
}

# Start node N on whatever data it has (detached: rabbitmq-server returns at once). A pid file left
# by a killed node goes first: `rabbitmqctl wait` would read the dead pid from it.
launch() {
  local i=$1 dir
  dir=$(dir_of "$i")
  rm -f "$dir/pid"
  (cd "$dir" && runuser -u rabbitmq -- env HOME="$RABBIT_HOME" ERL_EPMD_ADDRESS=127.0.0.1 ERL_FLAGS="$LOOPBACK_ONLY" \
    RABBITMQ_CONF_ENV_FILE=/dev/null \
    RABBITMQ_NODENAME="$(name_of "$i")" \
    RABBITMQ_DIST_PORT="${DIST_PORTS[i - 1]}" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/pid" \
    ERL_CRASH_DUMP="$dir/log/erl_crash.dump" \
    "$SBIN/rabbitmq-server" -detached) >>"$dir/log/startup.log" 2>&1
}

# Block until node N has booted (`rabbitmqctl wait` waits for the pid file, then for the node).
await_node() {
  local i=$1
  ctl "$i" wait "$(dir_of "$i")/pid" --timeout 90 >/dev/null ||
    { echo "node $(name_of "$i") did not start; see $(dir_of "$i")/log" >&2; return 1; }
}

# SIGKILL of node $1's VM (every node's without $1), and wait until it is gone.
kill_nodes() {
  local pids
  pids=$(beam_pids "${1:-}")
  [ -z "$pids" ] && return 0
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
  for _ in $(seq 1 100); do [ -z "$(beam_pids "${1:-}")" ] && return 0; sleep 0.1; done
  echo "cluster.sh: could not kill $pids" >&2
  return 1
}

install_if_asked() {
  [ -x "$SBIN/rabbitmq-server" ] && return 0
  if [ "${1:-}" != --install ]; then
    echo "RabbitMQ is not installed: sudo apt-get install rabbitmq-server, or scripts/cluster.sh up --install" >&2
    exit 1
  fi
  echo "installing rabbitmq-server from Debian's packages" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
}

urls() {
  local i out=
  for i in "${NODES[@]}"; do out+="${out:+;}amqp://guest:guest@127.0.0.1:${PORTS[i - 1]}/%2F"; done
  echo "$out"
}

up() {
  install_if_asked "${1:-}"
  local started i pids=() failed=0
  started=$(now)
  if whole; then
    echo "the cluster is already up and whole ($BASE)" >&2
    urls
    return 0
  fi
  if [ -n "$(beam_pids)" ] || [ -e "$BASE" ]; then
    echo "cleaning up an earlier run (its nodes and $BASE)" >&2
    kill_nodes
    rm -rf "$BASE"
  fi
  for port in "${PORTS[@]}" "${DIST_PORTS[@]}"; do
    answers "$port" && { echo "cluster.sh: port $port is taken by another program" >&2; exit 1; }
  done
  mkdir -p "$BASE"
  for i in "${NODES[@]}"; do write_config "$i"; done
  chown -R rabbitmq:rabbitmq "$BASE"
  for i in "${NODES[@]}"; do launch "$i" & done
  wait
  for i in "${NODES[@]}"; do await_node "$i" & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  [ "$failed" = 0 ] || exit 1
  # Peer discovery gives up after its tries and boots the node alone; then say so rather than hand out
  # three brokers that are not one cluster.
  for _ in $(seq 1 100); do whole && break; sleep 0.3; done
  whole || { echo "the nodes started but did not form one cluster; see $BASE/*/log" >&2; ctl 1 cluster_status >&2 || true; exit 1; }
  echo "cluster up in $(since "$started") s: $(name_of 1), $(name_of 2), $(name_of 3) ($BASE)" >&2
  urls
}

down() {
  local i
  if [ -n "$(beam_pids)" ]; then
    for i in "${NODES[@]}"; do ctl "$i" stop >/dev/null 2>&1 & done
    wait
    kill_nodes
  fi
  rm -rf "$BASE"
  echo "cluster down" >&2
}

status() {
  local i
  for i in "${NODES[@]}"; do
    if ctl "$i" cluster_status 2>/dev/null; then
      whole && { echo "whole: three nodes running" >&2; return 0; }
      echo "not whole" >&2
      return 1
    fi
  done
  echo "no node of the cluster answers" >&2
  return 1
}

# 1, 2, 3 or multillm-2@localhost -> 2
index_of() {
  local n=${1#multillm-}
  n=${n%@localhost}
  case $n in 1 | 2 | 3) echo "$n" ;; *) echo "cluster.sh: no node $1" >&2; exit 2 ;; esac
}

# Start nodes again on their data, in parallel (a node that was killed waits for its peers' tables
# when it boots, so when all are down none comes up alone); wait until the cluster is whole.
start_nodes() {
  local i pids=() failed=0 indexes=()
  [ $# -gt 0 ] || { echo "usage: cluster.sh start-node N..." >&2; exit 2; }
  for i in "$@"; do
    i=$(index_of "$i")
    indexes+=("$i")
  done
  for i in "${indexes[@]}"; do
    [ -d "$(dir_of "$i")" ] || { echo "no data for node $i in $BASE: scripts/cluster.sh up" >&2; exit 1; }
    [ -n "$(beam_pids "$(name_of "$i")")" ] && { echo "node $(name_of "$i") is already running" >&2; exit 1; }
  done
  for i in "${indexes[@]}"; do launch "$i" & done
  wait
  for i in "${indexes[@]}"; do await_node "$i" & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  [ "$failed" = 0 ] || exit 1
  for _ in $(seq 1 100); do whole && return 0; sleep 0.3; done
  echo "started $* but the cluster is not whole again" >&2
  exit 1
}

kill_node() {
  local i name
  i=$(index_of "${1:?kill N}")
  name=$(name_of "$i")
  [ -n "$(beam_pids "$name")" ] || { echo "node $name is not running" >&2; exit 1; }
  kill_nodes "$name"
}

case $command in
up) up "$@" ;;
down) down ;;
status) status ;;
start-node) start_nodes "$@" ;;
kill) kill_node "$@" ;;
ctl) ctl "$@" ;;
*) echo "usage: cluster.sh up|down|status [--install] | kill N | start-node N... | ctl N ARGS..." >&2; exit 2 ;;
esac
