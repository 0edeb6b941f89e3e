#!/bin/bash
# On first start, an empty data directory becomes a cluster with POSTGRES_USER (password POSTGRES_PASSWORD, scram) and
# database POSTGRES_DB, reachable over TCP with the password; then the command runs (`postgres -c ...`).
set -euo pipefail
if [[ ${1:-} == postgres && ! -s $PGDATA/PG_VERSION ]]; then
    user=${POSTGRES_USER:-postgres}
    : "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD: the server accepts password logins only}"
    initdb --username="$user" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") --auth-local=trust \
        --auth-host=scram-sha-256 --encoding=UTF8 >/dev/null
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    # Every address of the container's own network namespace, as the official image; `-c listen_addresses=` narrows it.
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    # listen_addresses='' while the database is made: nobody connects to a half-made server.
    pg_ctl -w -o "-c listen_addresses=''" start >/dev/null
    if [[ ${POSTGRES_DB:-$user} != postgres ]]; then createdb --username="$user" "${POSTGRES_DB:-$user}"; fi
    pg_ctl -w -m fast stop >/dev/null
    echo "entrypoint: initialised $PGDATA with user $user and database ${POSTGRES_DB:-$user}"
fi
exec "$@"
