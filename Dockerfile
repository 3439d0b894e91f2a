# vlmserve on a CUDA GPU: `docker build -t vlmserve .`, then
#   docker run --gpus all -p 8000:8000 -v vlmserve-models:/models vlmserve \
#     --config /opt/vlmserve/model_configs/qwen2-vl-7b-instruct.yaml
# Arguments after the image name go to `vlmserve serve` (they override the defaults below:
# argparse keeps the last --host/--port given).
#
# torch 2.13.0's Linux x86_64 wheel on PyPI is built against CUDA 13.0 (it pulls
# nvidia-*-cu13 wheels and cuda-toolkit 13.0), so the base is CUDA 13.0's runtime on Ubuntu
# 24.04; the node's driver must support CUDA 13.0 (R580 or newer).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu's own python3 (3.12); apt versions follow the base image's snapshot.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY deploy/constraints.txt deploy/constraints.txt
# torch first, alone: its CUDA wheels are the large layer and change only with the pin.
RUN /opt/venv/bin/pip install -c deploy/constraints.txt torch
COPY pyproject.toml setup.py README.md ./
COPY server server
COPY kernels kernels
RUN /opt/venv/bin/pip install -c deploy/constraints.txt . \
    && /opt/venv/bin/python -c "import vlmserve.cli, vlmserve.kernels"

FROM ${CUDA_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Triton compiles its CUDA launcher stubs with a C compiler against Python.h at first use,
# so the runtime keeps gcc and the Python headers.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# A fixed non-root uid/gid: the Kubernetes manifests' securityContext and fsGroup use 10001.
RUN groupadd --gid 10001 vlmserve \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /models --shell /usr/sbin/nologin vlmserve \
    && mkdir -p /models \
    && chown 10001:10001 /models
COPY --from=build /opt/venv /opt/venv
COPY model_configs /opt/vlmserve/model_configs
# Hub downloads and tiny demo models land on the /models volume, not in the image layer;
# Triton's compiled kernels too, so a restarted container does not recompile them.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models/huggingface \
    VLMSERVE_CACHE=/models/vlmserve \
    TRITON_CACHE_DIR=/models/triton
VOLUME ["/models"]
USER 10001:10001
WORKDIR /models
EXPOSE 8000
# /health fails after an engine fault; the start period covers loading a 72B checkpoint
# (the server listens only once the model is loaded).
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["vlmserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
