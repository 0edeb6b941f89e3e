#!/usr/bin/env bash
# Builds a Debian base image from Debian's packages alone, for hosts that cannot pull from an image registry
# (air-gapped labs, CI here): mmdebstrap writes a minimal bookworm root file system, `docker import` makes it an image.
#
#   docker/debian-base.sh [NAME] [APT_SOURCES]   default: fedtune-base:bookworm, this host's own apt sources
#   docker build --build-arg BASE=fedtune-base:bookworm --build-arg TORCH=cpu -t fedtune:cpu .
#
# The apt sources (a deb822 .sources or a one-line sources.list file) are the mirror the image's apt uses later too.
# DOCKER (default: docker) is the client command.
set -euo pipefail

name=${1:-fedtune-base:bookworm}
sources=${2:-$(ls /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1 || true)}
sources=${sources:-/etc/apt/sources.list}
read -r -a docker <<<"${DOCKER:-docker}"

if ! command -v mmdebstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
fi
# Like Debian's -slim images: no manuals, docs or translations.
mmdebstrap --variant=minbase --quiet \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm - "$sources" | "${docker[@]}" import --change 'CMD ["bash"]' - "$name" >/dev/null
echo "debian-base.sh: built $name from $sources" >&2
