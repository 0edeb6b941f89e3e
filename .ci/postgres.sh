#!/usr/bin/env bash
# Starts a throwaway PostgreSQL server on loopback for the Optuna tests (Debian's package) and prints its URL.
#
#   .ci/postgres.sh        start (or reuse) the server; stdout: postgresql+psycopg://postgres@127.0.0.1:PORT/optuna
#   .ci/postgres.sh stop   stop it
#
# Idempotent: a server already answering on the port is reused. The URL is also written to $PG_URL_FILE
# (default: $PG_ROOT/url). Settings: PG_PORT (55432), PG_ROOT (${TMPDIR:-/tmp}/fedtune-postgres-$PG_PORT).
# Authentication is "trust" on 127.0.0.1 only: a test fixture, not a server to keep.
set -euo pipefail

port=${PG_PORT:-55432}
root=${PG_ROOT:-${TMPDIR:-/tmp}/fedtune-postgres-$port}
url_file=${PG_URL_FILE:-$root/url}
url="postgresql+psycopg://postgres@127.0.0.1:$port/optuna"

pg_bin() { find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1; }
bin=$(pg_bin)
if [[ -z $bin ]]; then
    echo "postgres.sh: installing Debian's postgresql" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    bin=$(pg_bin)
fi

# initdb and postgres refuse to run as root: run them as the postgres user then.
as_owner() {
    if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [[ ${1:-} == stop ]]; then
    [[ -f $root/data/postmaster.pid ]] && as_owner "$bin/pg_ctl" -D "$root/data" -m fast -w stop >&2
    exit 0
fi

if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; then
    echo "postgres.sh: reusing the server on 127.0.0.1:$port" >&2
else
    mkdir -p "$root"
    [[ $(id -u) == 0 ]] && chown postgres: "$root"
    if [[ ! -f $root/data/PG_VERSION ]]; then
        as_owner "$bin/initdb" -D "$root/data" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
    fi
    # fsync off: a crash may lose this throwaway server's data, which only tests use
    as_owner "$bin/pg_ctl" -D "$root/data" -l "$root/server.log" -w -t 60 start \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $root -c fsync=off -c max_connections=200" >&2
    echo "postgres.sh: started a server on 127.0.0.1:$port (data in $root/data)" >&2
fi

if [[ -z $("$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'optuna'") ]]; then
    "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres optuna
fi
mkdir -p "$(dirname "$url_file")"
echo "$url" >"$url_file"
echo "$url"
