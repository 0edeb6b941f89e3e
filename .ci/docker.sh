#!/usr/bin/env bash
# A private Docker engine for the container tests: Debian's dockerd with its own data root and socket, no bridge
# network (every build and container uses the host network), stopped by its pid.
#
#   .ci/docker.sh start   start the engine (installing docker.io and docker-compose if missing); stdout: DOCKER_HOST
#   .ci/docker.sh stop    remove every container, stop the engine by pid, and fail if a daemon or mount is left
#
# Settings: DOCKER_ROOT (/var/lib/fedtune-docker) keeps images and the build cache between runs; DOCKER_RUN
# (/run/fedtune-docker) holds the socket, pid file and log (a unix socket path must stay under 108 bytes).
set -euo pipefail

root=${DOCKER_ROOT:-/var/lib/fedtune-docker}
run=${DOCKER_RUN:-/run/fedtune-docker}
socket=$run/docker.sock
pid_file=$run/dockerd.pid
# Debian's client: the newer one first on PATH here refuses the 20.10 engine's BuildKit without buildx.
docker=(/usr/bin/docker --host "unix://$socket")

running() { [[ -f $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; }

engine_mounts() { awk -v root="$root" -v run="$run" 'index($2, root) == 1 || index($2, run) == 1 { print $2 }' /proc/self/mounts; }

leftovers() {
    pgrep -a -x dockerd || true
    pgrep -a -f "containerd.*$run" || true
    engine_mounts
}

start() {
    if [[ ! -x /usr/sbin/dockerd || ! -x /usr/bin/docker-compose ]]; then
        echo "docker.sh: installing Debian's docker.io and docker-compose" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose >/dev/null
    fi
    mkdir -p "$root" "$run"
    if ! running; then
        # No bridge, no iptables: the engine must not touch the host's network; containers use --network host.
        /usr/sbin/dockerd --bridge=none --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
            --data-root "$root" --exec-root "$run" --pidfile "$pid_file" --host "unix://$socket" \
            >"$run/dockerd.log" 2>&1 &
        for _ in $(seq 100); do
            "${docker[@]}" version >/dev/null 2>&1 && break
            kill -0 $! 2>/dev/null || break
            sleep 0.2
        done
    fi
    if ! "${docker[@]}" version >/dev/null 2>&1; then
        echo "docker.sh: the engine did not start; its log ($run/dockerd.log) ends with:" >&2
        tail -n 20 "$run/dockerd.log" >&2 || true
        exit 1
    fi
    echo "docker.sh: engine up on $socket (data root $root)" >&2
    echo "unix://$socket"
}

stop() {
    if running; then
        local pid
        pid=$(cat "$pid_file")
        # Containers first, so that the engine's shutdown has nothing to wait for.
        "${docker[@]}" ps -aq | xargs -r "${docker[@]}" rm -f -v >/dev/null 2>&1 || true
        kill "$pid"
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "docker.sh: engine $pid stopped" >&2
    fi
    # dockerd leaves its network namespace bind-mounted (netns/default) when it exits; the mounts are its own.
    engine_mounts | tac | xargs -r -n 1 umount
    local left
    left=$(leftovers)
    if [[ -n $left ]]; then
        echo "docker.sh: left behind after stopping the engine:" >&2
        echo "$left" >&2
        exit 1
    fi
    echo "docker.sh: no dockerd, containerd or mount of $root / $run is left" >&2
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
