# syntax=docker/dockerfile:1
# The OIDC sidecar's image: `docker build -t oidc-sidecar:0.1.0 .` (BuildKit, the default builder).
# Two stages: `build` turns the project and its pinned dependencies into wheels (with a
# compiler at hand, for a dependency without a wheel for this platform); the final stage
# installs those wheels only, runs as a non-root user and needs no writable path, so it runs
# with a read-only root filesystem.
# For reproducible builds pin the base image by digest: python:3.11-slim@sha256:...

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# pyproject.toml pins every runtime dependency (==), so the wheels are those exact versions.
COPY pyproject.toml README.md ./
COPY sidecar/ sidecar/
RUN pip wheel --wheel-dir /wheels .


FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="oidc-sidecar" \
      org.opencontainers.image.description="OpenID Connect auth sidecar for Sync Gateway, CouchDB and other sync services" \
      org.opencontainers.image.licenses="Apache-2.0"
# No .pyc written at run time (the root filesystem is read-only; pip compiled them at
# install), logs unbuffered to stdout/stderr, no pip cache in the image.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The wheels are bind-mounted from the build stage, so no layer keeps them. pip itself,
# setuptools and wheel are removed afterwards: nothing needs them at run time.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links=/wheels --compile oidc-sidecar \
    && python -m pip uninstall --yes pip setuptools wheel
# A fixed numeric uid/gid, so that Kubernetes can verify runAsNonRoot and the pod's
# runAsUser/fsGroup can match it (deploy/kubernetes/base/deployment.yaml).
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin sidecar
USER 10001:10001
WORKDIR /
# 4984: public listener (clients), 4985: admin listener (admin API, /_metrics): keep it private.
EXPOSE 4984 4985
# No HEALTHCHECK: Kubernetes probes GET /_health and /_ready; the ports depend on the config.
ENTRYPOINT ["sidecar"]
CMD ["run", "--config", "/etc/sidecar/sidecar.yaml"]
