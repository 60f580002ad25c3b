#!/usr/bin/env bash
# First start: initdb with POSTGRES_USER/POSTGRES_PASSWORD and create POSTGRES_DBS (space-separated).
# Every start: PostgreSQL on 127.0.0.1:POSTGRES_PORT only (the stack runs with host networking).
set -euo pipefail
: "${POSTGRES_USER:?}" "${POSTGRES_PASSWORD:?}"
port="${POSTGRES_PORT:-5432}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile="$(mktemp)"; printf '%s' "$POSTGRES_PASSWORD" > "$pwfile"
  initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" --auth=scram-sha-256 -E UTF8 >/dev/null
  rm -f "$pwfile"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=127.0.0.1 -p $port" -w start >/dev/null
  for db in ${POSTGRES_DBS:-}; do
    PGPASSWORD="$POSTGRES_PASSWORD" psql -h 127.0.0.1 -p "$port" -U "$POSTGRES_USER" -d postgres -qc "CREATE DATABASE \"$db\";"
  done
  pg_ctl -D "$PGDATA" -w stop >/dev/null
fi
exec postgres -D "$PGDATA" -c listen_addresses=127.0.0.1 -p "$port"
