# Two images from one file:
#   docker build --target server   -t REGISTRY/zimage-server:TAG .
#   docker build --target operator -t REGISTRY/zimage-operator:TAG .
# PyTorch comes from PyPI with its CUDA libraries; the node's NVIDIA driver is mounted into the
# container by the NVIDIA container toolkit, so no CUDA base image is needed.
# BASE_IMAGE: any Debian bookworm image with Python 3.11 as `python` and its venv module; the
# local cluster builds one with debootstrap where the official image cannot be pulled
# (tests/cluster/images.py). No `# syntax=` line: BuildKit's built-in Dockerfile frontend
# builds it without pulling a frontend image.

ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE} AS python-base
# The images run as 10001; programs that look their user up (getpass.getuser(): PyTorch's
# compile cache, Kopf) find it in the password database.
RUN groupadd --gid 10001 zimage \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin zimage
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The standard library as bytecode. The official python images delete its .pyc files, and
# with PYTHONDONTWRITEBYTECODE every process would compile what it imports of it again, at
# each start (seconds of a new replica's start: docs/performance.md). pip writes the
# packages' bytecode when it installs them.
RUN python -m compileall -q -j 0 -x '/(test|tests|idle_test)/' "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"

# -- build stages: the dependencies' virtual environments, and the project's source ------------
# The dependencies go in a layer of their own, below the code: a change to the code does not
# download them again. Their list is read from pyproject.toml into a file first, and
# only that file goes into the layer, so an edit elsewhere in pyproject.toml does not either.
# Where HTTPS goes through a proxy with its own CA, pass its bundle as a build secret
# (`--secret id=pip-ca,src=ca.crt`); it is not kept in the image.
FROM python-base AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN mkdir /requirements \
    && printf '%s\n' \
      'import tomllib' \
      'config = tomllib.load(open("pyproject.toml", "rb"))' \
      'project, extras = config["project"], config["project"]["optional-dependencies"]' \
      'for name, wanted in (("server", ["server", "fp8"]), ("operator", ["operator"])):' \
      '    lines = config["build-system"]["requires"] + project["dependencies"]' \
      '    lines += [dep for extra in wanted for dep in extras[extra]]' \
      '    open(f"/requirements/{name}.txt", "w").write("\n".join(lines) + "\n")' \
      > /tmp/requirements.py \
    && python /tmp/requirements.py

FROM python-base AS venv
# install-requirements: pip installs requirements.txt under constraints.txt into the venv, with
# the proxy CA when the build passes one as the secret pip-ca. Only the venv goes on to the
# images, not this script.
RUN python -m venv /opt/venv \
    && printf '%s\n' \
      '#!/bin/sh' \
      'set -e' \
      'if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi' \
      'exec /opt/venv/bin/pip install -c constraints.txt -r requirements.txt' \
      > /usr/local/bin/install-requirements \
    && chmod +x /usr/local/bin/install-requirements
WORKDIR /src

# What the images install of this project, and nothing else of the build context.
FROM scratch AS source
COPY pyproject.toml README.md /
COPY server /server
COPY operator /operator

FROM venv AS server-deps
COPY constraints.txt ./
COPY --from=requirements /requirements/server.txt ./requirements.txt
RUN --mount=type=secret,id=pip-ca install-requirements

FROM venv AS operator-deps
COPY constraints.txt ./
COPY --from=requirements /requirements/operator.txt ./requirements.txt
RUN --mount=type=secret,id=pip-ca install-requirements

# -- the inference server ---------------------------------------------------------------------
# The project goes in a small layer of its own above the dependencies' (gigabytes, with
# PyTorch's CUDA libraries), so a change to the code rebuilds and ships only that layer. The
# source is bind-mounted for the install, not copied into the image.
FROM python-base AS server
COPY --from=server-deps /opt/venv /opt/venv
RUN --mount=type=bind,from=source,target=/src,rw \
    /opt/venv/bin/pip install --no-deps --no-build-isolation "/src[server,fp8]"
# Writable paths, and only these: the model and Hub caches, the compile cache and /tmp.
RUN mkdir -p /models /var/cache/zimage \
    && chown -R 10001:10001 /models /var/cache/zimage
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    HF_HOME=/var/cache/zimage/hf \
    ZIMAGE_CACHE_DIR=/var/cache/zimage \
    ZIMAGE_HF_CACHE_DIR=/models/hub \
    ZIMAGE_HOST=0.0.0.0 \
    ZIMAGE_PORT=8000
VOLUME ["/models", "/var/cache/zimage", "/tmp"]
USER 10001:10001
EXPOSE 8000 8001
ENTRYPOINT ["zimage-server"]
CMD ["serve"]

# -- the operator (no torch) --------------------------------------------------------------------
FROM python-base AS operator
COPY --from=operator-deps /opt/venv /opt/venv
RUN --mount=type=bind,from=source,target=/src,rw \
    /opt/venv/bin/pip install --no-deps --no-build-isolation "/src[operator]"
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["zimage-operator"]
