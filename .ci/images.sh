#!/usr/bin/env bash
# Builds the images the container tests run, on the engine at DOCKER_HOST, with nothing but Debian's mirror and PyPI:
#   fedtune-base:bookworm    a Debian base from Debian's packages (docker/debian-base.sh), as no registry is reachable
#   fedtune-postgres:15      PostgreSQL 15 from Debian's packages, standing in for the official postgres:16
#   fedtune:cpu              the Dockerfile on that base with the CPU build of torch
# torch's CPU wheel and its dependencies come from a PyTorch-index mirror served on 127.0.0.1 for the build, filled
# by this host's pip (its find-links hold the wheel); the host's CA certificates go in as the CA_CERTS build argument.
# Prints each build's time. IMAGE (fedtune:cpu) names the image; TORCH_MIRROR_PORT (45080) is the mirror's port.
set -euo pipefail
cd "$(dirname "$0")/.."

image=${IMAGE:-fedtune:cpu}
docker=(/usr/bin/docker)  # Debian's client: it speaks the 20.10 engine's API (see .ci/docker.sh)
export DOCKER=/usr/bin/docker DOCKER_BUILDKIT=0
timed() {
    local started=$SECONDS
    "$@"
    echo "images: $1 ${*: -1} took $((SECONDS - started)) s" >&2
}

if ! "${docker[@]}" image inspect fedtune-base:bookworm >/dev/null 2>&1; then
    timed docker/debian-base.sh fedtune-base:bookworm
fi
timed "${docker[@]}" build --quiet --network host --build-arg BASE=fedtune-base:bookworm \
    -t fedtune-postgres:15 docker/postgres

# The mirror: torch==VERSION+cpu and what it needs, at the lock's versions, laid out as a PEP 503 index.
mirror=$(mktemp -d)
server_log=$mirror/server.log
trap 'kill "$server" 2>/dev/null || true; rm -rf "$mirror"' EXIT
grep -Eiv '^(-e |#|fedtune( |=|@))' requirements.lock >"$mirror/constraints.txt"
.venv/bin/pip download -q --only-binary=:all: --dest "$mirror/files" -c "$mirror/constraints.txt" \
    "torch==$(sed -n 's/^torch==//p' requirements.lock)+cpu"
for wheel in "$mirror"/files/*.whl; do
    project=$(basename "$wheel" | cut -d- -f1 | tr '_.' '--' | tr '[:upper:]' '[:lower:]')
    mkdir -p "$mirror/simple/$project" && ln "$wheel" "$mirror/simple/$project/"
done
# A fixed port: the index URL is a build argument, and a new value would rebuild every layer after it.
port=${TORCH_MIRROR_PORT:-45080}
python3 -u -m http.server "$port" --bind 127.0.0.1 --directory "$mirror/simple" >"$server_log" 2>&1 &
server=$!
until grep -q "Serving HTTP" "$server_log"; do
    kill -0 "$server" 2>/dev/null || { echo "images: the torch mirror cannot serve on 127.0.0.1:$port" >&2; cat "$server_log" >&2; exit 1; }
    sleep 0.1
done

# The certificates update-ca-certificates adds to the system store here (a TLS-intercepting egress proxy's among them).
ca_certs=$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)
timed "${docker[@]}" build --network host --build-arg BASE=fedtune-base:bookworm --build-arg TORCH=cpu \
    --build-arg TORCH_INDEX="http://127.0.0.1:$port" --build-arg CA_CERTS="$ca_certs" -t "$image" .
"${docker[@]}" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^(fedtune|fedtune-postgres|fedtune-base):' >&2
