# syntax=docker/dockerfile:1
#
# The labctl worker image, for GPU and CPU workers alike (docker-compose.yml builds it once).
#
# CUDA: torch 2.14.1's PyPI wheels bundle the CUDA 13 runtime, cuDNN and NCCL as nvidia-*
# packages, so a slim Python base is enough; the container needs only the host's NVIDIA
# driver (R580 or newer for CUDA 13), which the NVIDIA Container Toolkit mounts in when
# compose reserves a GPU. On a host without a GPU the same image trains on the CPU.
#
#   docker build -f gpu.Dockerfile -t labctl .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LABCTL_ARTIFACTS_DIR=/artifacts \
    LABCTL_DATA_DIR=/data \
    LABCTL_METRICS_PORT=9808 \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib

# An unprivileged user owns the artefact and data mount points; a named volume mounted there
# starts with this ownership.
RUN groupadd --gid 10001 labctl \
    && useradd --uid 10001 --gid labctl --create-home --shell /usr/sbin/nologin labctl \
    && mkdir -p /artifacts /data /cache /var/lock/labctl-gpus \
    && chown labctl:labctl /artifacts /data /cache /var/lock/labctl-gpus

WORKDIR /app

# Dependencies first, from pyproject.toml alone: the multi-GB torch layer is rebuilt only when
# the dependency list changes, not on every source edit. The pip cache mount keeps wheels
# across builds without storing them in the image.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the source, installed without touching the dependencies again.
COPY README.md* ./
COPY cli ./cli
COPY shared ./shared
COPY worker ./worker
COPY bench ./bench
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
    && labctl --version

# Picks a free GPU per replica when compose mounts the shared lock folder; otherwise a no-op.
COPY --chmod=0755 deploy/gpu-entrypoint.sh /usr/local/bin/labctl-entrypoint

USER labctl

EXPOSE 9808

# Healthy = the worker process is up and serving /metrics. Not `celery inspect ping`: the solo
# pool answers control commands only between jobs, so a worker busy with a two-hour epoch loop
# would be reported unhealthy (and restarted by an orchestrator) while it works fine.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('LABCTL_METRICS_PORT', '9808'), timeout=4)" || exit 1

ENTRYPOINT ["labctl-entrypoint"]
CMD ["labctl", "worker"]
