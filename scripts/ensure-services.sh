#!/usr/bin/env bash
# Make sure RabbitMQ and PostgreSQL answer. Local services that are installed but stopped
# are started; anything else gets an exact instruction. Used by `make demo` and `make test`.
set -euo pipefail

AMQP_URL="${OMNIROUTE_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}"
DATABASE_URL="${OMNIROUTE_DATABASE_URL:-postgresql://127.0.0.1:5432/omniroute}"

hostport() {  # URL default-port → "host port"
  python3 - "$1" "$2" <<'PY'
import sys
from urllib.parse import urlsplit
u = urlsplit(sys.argv[1])
print(u.hostname or "127.0.0.1", u.port or int(sys.argv[2]))
PY
}

reachable() {  # host port
  timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

wait_for() {  # name host port seconds
  local i
  for ((i = 0; i < $4 * 2; i++)); do
    reachable "$2" "$3" && return 0
    sleep 0.5
  done
  echo "error: $1 did not come up on $2:$3 within $4 s" >&2
  return 1
}

is_local() { [[ "$1" == "127.0.0.1" || "$1" == "localhost" || "$1" == "::1" ]]; }

read -r AMQP_HOST AMQP_PORT < <(hostport "$AMQP_URL" 5672)
read -r PG_HOST PG_PORT < <(hostport "$DATABASE_URL" 5432)

if ! reachable "$AMQP_HOST" "$AMQP_PORT"; then
  if is_local "$AMQP_HOST" && command -v rabbitmq-server >/dev/null 2>&1; then
    echo "starting RabbitMQ (rabbitmq-server -detached)…"
    rabbitmq-server -detached || true
    wait_for RabbitMQ "$AMQP_HOST" "$AMQP_PORT" 90
  else
    echo "error: RabbitMQ is not reachable at $AMQP_HOST:$AMQP_PORT." >&2
    echo "       Start it, e.g.: docker compose up -d rabbitmq postgres" >&2
    exit 1
  fi
fi
if command -v rabbitmqctl >/dev/null 2>&1 && is_local "$AMQP_HOST"; then
  timeout 60 rabbitmqctl await_startup >/dev/null 2>&1 || true
fi

if ! reachable "$PG_HOST" "$PG_PORT"; then
  if is_local "$PG_HOST" && command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    version="$(ls /etc/postgresql | sort -V | tail -n1)"
    echo "starting PostgreSQL $version (pg_ctlcluster)…"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for PostgreSQL "$PG_HOST" "$PG_PORT" 60
  else
    echo "error: PostgreSQL is not reachable at $PG_HOST:$PG_PORT." >&2
    echo "       Start it, e.g.: docker compose up -d rabbitmq postgres" >&2
    exit 1
  fi
fi
echo "services: RabbitMQ $AMQP_HOST:$AMQP_PORT and PostgreSQL $PG_HOST:$PG_PORT are up"
