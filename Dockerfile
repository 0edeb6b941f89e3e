# syntax=docker/dockerfile:1
# The fedtune image: PyTorch's CUDA 13.0 build, the locked dependencies and the project, with `fedtune` as entrypoint.
#   docker build -t fedtune:latest .            (--build-arg UID=$(id -u) when your uid is not 1000)
#   docker run --rm --gpus all -v "$PWD:/workspace" -e MLFLOW_TRACKING_URI fedtune:latest train
# The `base` flavour is enough: the torch wheel brings its own CUDA runtime, cuBLAS, cuDNN and NCCL, which the
# `runtime`/`cudnn-runtime` flavours would only duplicate (several GB). CUDA 13.0 needs an R580 or newer host driver.
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

# The torch pin of requirements.lock is the CPU wheel of the same release (it was frozen on a CPU machine).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG TORCH_VERSION=2.13.0+cu130
# The usual uid of the first user on a Linux host, so files written into a bind-mounted workspace are theirs.
ARG UID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Exact Debian-style pins would break the build at Ubuntu's next security update; the base tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.12 -m venv "$VIRTUAL_ENV"

# Its own layer, so that a changed lock does not fetch the multi-GB CUDA wheels again.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION"

# Everything else from PyPI at the locked versions; torch (already there) and the project's own line are left out.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=requirements.lock,target=/tmp/requirements.lock \
    grep -Eiv '^(torch==|-e |fedtune( |=|@))' /tmp/requirements.lock > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The sources are bind-mounted, not copied: the installed package is all the image keeps of them.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,target=/src,rw \
    pip install --no-deps /src

# Ubuntu's images come with user `ubuntu` holding uid 1000; it gives way to ours.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid "$UID" --shell /bin/bash fedtune \
    && mkdir -p /workspace /home/fedtune/.cache/huggingface \
    && chown -R fedtune:fedtune /workspace /home/fedtune/.cache

# Models and datasets download into a volume, never into the container's layer. MLFLOW_TRACKING_URI and the
# FEDTUNE_* settings come from the environment at run time (compose.yaml, `fedtune launch`, `docker run -e`).
ENV HF_HOME=/home/fedtune/.cache/huggingface
VOLUME ["/home/fedtune/.cache/huggingface"]

# Numeric, so that Kubernetes runAsNonRoot and the like can check it.
USER $UID
WORKDIR /workspace
ENTRYPOINT ["fedtune"]
CMD ["--help"]
