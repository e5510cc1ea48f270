#!/usr/bin/env bash
# Make sure the servers the tests and the demo need are up on this machine.
#   scripts/services.sh broker            start the local RabbitMQ if it is installed but down,
#                                         else `docker compose up -d rabbitmq` where a Docker engine runs,
#                                         else say in one line how to get one (exit 1)
#   scripts/services.sh broker --install  also install RabbitMQ from Debian's packages when missing (CI)
#   scripts/services.sh postgres --install  the same for PostgreSQL (the tests' SQL sink)
#   scripts/services.sh compose --install   Docker Compose, which tests/test_compose.py asks to read
#                                         docker-compose.yml (no Docker engine needed): Debian's v1
#                                         when neither the v2 plugin nor v1 is there
#   scripts/services.sh prometheus --install  Prometheus and promtool, which tests/test_prometheus.py runs
#                                         (it starts servers of its own): Debian's package when either
#                                         is missing; and RabbitMQ's rabbitmq_prometheus plugin on a
#                                         local broker, whose metrics the alert rules read
set -euo pipefail
what=${1:?usage: services.sh broker|postgres|compose|prometheus [--install]}
install=${2:-}
PY=${PY:-python3}
BROKER_URL=${MULTILLM_BROKER_URL:-amqp://guest:guest@localhost:5672/%2F}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  echo "installing $* from Debian's packages" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

broker_answers() {
  "$PY" - "$BROKER_URL" <<'PYEOF'
import socket, sys
from urllib.parse import urlsplit
url = urlsplit(sys.argv[1])
try:
    socket.create_connection((url.hostname or "localhost", url.port or 5672), timeout=2).close()
except OSError:
    sys.exit(1)
PYEOF
}

# The tests make a vhost of their own for each test through the management HTTP API (tens of
# milliseconds; rabbitmqctl boots an Erlang VM each time: about 1.5 s a test). Enabled on a local
# broker that lacks it; without it the tests fall back to rabbitmqctl.
management() {
  command -v rabbitmq-plugins >/dev/null || return 0
  grep -q rabbitmq_management /etc/rabbitmq/enabled_plugins 2>/dev/null && return 0
  echo "enabling RabbitMQ's management plugin (rabbitmq-plugins enable rabbitmq_management)" >&2
  as_root rabbitmq-plugins -q enable rabbitmq_management >/dev/null || echo "could not enable it: the tests use rabbitmqctl" >&2
}

broker() {
  broker_answers && { management; return 0; }
  if ! command -v rabbitmq-server >/dev/null && [ "$install" = --install ]; then
    apt_install rabbitmq-server
  fi
  if command -v rabbitmq-server >/dev/null; then
    if as_root rabbitmqctl -q ping >/dev/null 2>&1; then
      # The node runs but its application was stopped (rabbitmqctl stop_app).
      echo "starting the local RabbitMQ application (rabbitmqctl start_app)" >&2
      as_root rabbitmqctl -q start_app
    else
      echo "starting the local RabbitMQ (rabbitmq-server -detached)" >&2
      as_root rabbitmq-server -detached
    fi
    # -detached returns before the node is reachable, and await_startup fails at once on a
    # node it cannot reach yet: try it until it succeeds.
    for attempt in $(seq 1 60); do
      as_root rabbitmqctl -q await_startup --timeout 60 >/dev/null 2>&1 && break
      [ "$attempt" = 60 ] && { echo "RabbitMQ did not start; see /var/log/rabbitmq" >&2; exit 1; }
      sleep 2
    done
  elif docker info >/dev/null 2>&1; then
    echo "starting RabbitMQ with docker compose" >&2
    docker compose up -d --wait rabbitmq
  else
    echo "no RabbitMQ answers at ${BROKER_URL//:*@/:***@}: install one (sudo apt-get install rabbitmq-server), run 'docker compose up -d rabbitmq' on a machine with Docker, or set MULTILLM_BROKER_URL" >&2
    exit 1
  fi
  for _ in $(seq 1 60); do broker_answers && { management; return 0; }; sleep 1; done
  echo "RabbitMQ was started but does not answer at ${BROKER_URL//:*@/:***@}" >&2
  exit 1
}

postgres() {
  pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && return 0
  if ! command -v pg_ctlcluster >/dev/null; then
    [ "$install" = --install ] || { echo "no PostgreSQL at 127.0.0.1:5432 and none installed (sudo apt-get install postgresql)" >&2; exit 1; }
    apt_install postgresql
    # A fresh Debian cluster asks TCP clients for a password; the tests connect as postgres without one.
    hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -n 1)
    grep -q "multillm-tests" "$hba" || as_root sed -i '1i host all all 127.0.0.1/32 trust # multillm-tests' "$hba"
  fi
  version=$(ls /etc/postgresql | head -n 1)
  echo "starting the local PostgreSQL $version" >&2
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && return 0; sleep 1; done
  echo "PostgreSQL was started but does not answer at 127.0.0.1:5432" >&2
  exit 1
}

compose() {
  docker compose version >/dev/null 2>&1 && return 0
  command -v docker-compose >/dev/null && return 0
  [ "$install" = --install ] || { echo "no Docker Compose (sudo apt-get install docker-compose)" >&2; exit 1; }
  apt_install docker-compose
}

# The broker's own metrics (per queue: messages, consumers) come from its rabbitmq_prometheus plugin
# on port 15692; the alerts on a queue nobody consumes and on dead letters piling up read them.
# Enabled on a local broker that lacks it; on a node that is down, in its plugins file, for its next start.
broker_metrics() {
  command -v rabbitmq-plugins >/dev/null || return 0
  grep -q rabbitmq_prometheus /etc/rabbitmq/enabled_plugins 2>/dev/null && return 0
  echo "enabling RabbitMQ's Prometheus plugin (rabbitmq-plugins enable rabbitmq_prometheus)" >&2
  as_root rabbitmq-plugins -q enable rabbitmq_prometheus >/dev/null 2>&1 \
    || as_root rabbitmq-plugins -q enable --offline rabbitmq_prometheus >/dev/null \
    || echo "could not enable it: the broker's queries in tests/test_prometheus.py will fail" >&2
}

prometheus() {
  if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    [ "$install" = --install ] || { echo "no prometheus and promtool (sudo apt-get install prometheus)" >&2; exit 1; }
    # Without its recommends: node-exporter would take port 9100, the workers' metrics port in the docs.
    apt_install --no-install-recommends prometheus
  fi
  broker_metrics
}

"$what"
