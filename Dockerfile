# The fedtune image: Python, PyTorch (CUDA 13.0 build by default), the locked dependencies and the project, with
# `fedtune` as entrypoint. Builds with the classic engine and with BuildKit alike (no BuildKit-only syntax).
#   docker build -t fedtune:latest .                                   CUDA: torch 2.13.0+cu130 on NVIDIA's CUDA base
#   docker build --build-arg BASE=debian:bookworm-slim --build-arg TORCH=cpu -t fedtune:cpu .      a CPU image
#   docker run --rm --gpus all -v "$PWD:/workspace" -e MLFLOW_TRACKING_URI fedtune:latest train
# Build arguments (docs/containers.md has the air-gapped and proxy recipes):
#   BASE         any Debian or Ubuntu image, e.g. one made by docker/debian-base.sh where no registry is reachable
#   TORCH        the PyTorch build: cu130 (default), cpu, or another of PyTorch's wheel indexes
#   TORCH_INDEX  where that build comes from (default: PyTorch's index for it; or a mirror)
#   PIP_INDEX_URL  where every other dependency comes from (default: PyPI; or a mirror)
#   CA_CERTS     PEM text of extra CA certificates, for builds behind a TLS-intercepting proxy: trusted in the build
#                stage only, so neither the image nor its history carries them
#   UID          the user's uid (default 1000), so files written into a bind-mounted workspace are the host user's
# The `base` flavour of the CUDA image is enough: the torch wheel brings its own CUDA runtime, cuBLAS, cuDNN and NCCL,
# which the `runtime`/`cudnn-runtime` flavours would only duplicate (several GB). CUDA 13.0 needs an R580+ driver.
ARG BASE=nvidia/cuda:13.0.2-base-ubuntu24.04

# python: the base with Python; the build stages and the image all start from it.
FROM ${BASE} AS python
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Exact distribution pins would break the build at the next security update; the base tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# deps: the dependencies in /opt/venv. The index URLs and CA certificates live in this stage only.
FROM python AS deps
ARG CA_CERTS=""
# pip's bundled certifi would ignore the system store that CA_CERTS joins.
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN if [ -n "$CA_CERTS" ]; then \
        printf '%s\n' "$CA_CERTS" >/usr/local/share/ca-certificates/build.crt && update-ca-certificates >/dev/null; \
    fi \
    && python3 -m venv "$VIRTUAL_ENV"

# Its own layer, before the lock, so that a changed lock does not fetch the multi-GB CUDA wheels again.
# requirements.lock pins the same release (it was frozen on a CPU machine, where the build suffix is left out).
ARG TORCH_VERSION=2.13.0
ARG TORCH=cu130
ARG TORCH_INDEX=https://download.pytorch.org/whl/${TORCH}
RUN pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION+$TORCH"

# Everything else at the locked versions; torch (already there) and the project's own line are left out.
ARG PIP_INDEX_URL=https://pypi.org/simple
COPY requirements.lock /tmp/requirements.lock
RUN grep -Eiv '^(torch==|-e |#|fedtune( |=|@))' /tmp/requirements.lock >/tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.*

# wheel: the project as a wheel; a source change rebuilds from here on, never the dependencies.
FROM deps AS wheel
COPY pyproject.toml README.md /src/
COPY training /src/training
COPY analysis /src/analysis
RUN pip wheel --no-deps --wheel-dir /wheels /src

# The image: Python, the dependencies, the project, a non-root user.
FROM python
ARG UID=1000
COPY --from=deps /opt/venv /opt/venv
# Ubuntu's images come with user `ubuntu` holding uid 1000; it gives way to ours.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid "$UID" --shell /bin/bash fedtune \
    && mkdir -p /workspace /home/fedtune/.cache/huggingface \
    && chown -R fedtune:fedtune /workspace /home/fedtune/.cache
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-deps --no-index /tmp/wheels/*.whl && rm -rf /tmp/wheels

# Models and datasets download into a volume, never into the container's layer. MLFLOW_TRACKING_URI and the
# FEDTUNE_* settings come from the environment at run time (compose.yaml, `fedtune launch`, `docker run -e`).
# The image has no git, so runs record no commit from inside; MLflow need not warn about it at length.
ENV HF_HOME=/home/fedtune/.cache/huggingface \
    GIT_PYTHON_REFRESH=quiet
VOLUME ["/home/fedtune/.cache/huggingface"]

# Numeric, so that Kubernetes runAsNonRoot and the like can check it.
USER $UID
WORKDIR /workspace
ENTRYPOINT ["fedtune"]
CMD ["--help"]
