# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target server   -t REGISTRY/zimage-server:TAG .
#   docker build --target operator -t REGISTRY/zimage-operator:TAG .
# PyTorch comes from PyPI with its CUDA libraries; the node's NVIDIA driver is mounted into the
# container by the NVIDIA container toolkit, so no CUDA base image is needed.

FROM python:3.11.11-slim-bookworm AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# -- build stages: virtual environments with the project installed --------------------------
FROM python-base AS sources
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY server ./server
COPY operator ./operator

FROM sources AS build-server
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -c constraints.txt ".[server,fp8]"

FROM sources AS build-operator
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -c constraints.txt ".[operator]"

# -- the inference server ---------------------------------------------------------------------
FROM python-base AS server
COPY --from=build-server /opt/venv /opt/venv
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
COPY --from=build-operator /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["zimage-operator"]
