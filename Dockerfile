# loraloop on a GPU: the generation service (default command) or the bot, from one image.
#   docker build -t loraloop .
#   docker compose up -d          # service (GPU reserved) + bot, sharing the data volume; see compose.yaml
#   LORALOOP_BACKEND=ray docker compose --profile ray up -d   # + a Ray head and a GPU worker (README)
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    LORALOOP_DATA_DIR=/data \
    HF_HOME=/data/hf-cache \
    LORALOOP_SERVICE_TOKEN_FILE=/data/service_token

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv

# The GPU build of torch first, in its own layer: it is the big download and changes rarely.
# On Linux x86_64, PyPI's default torch wheel is the CUDA build and brings its CUDA libraries.
ARG TORCH_SPEC=torch
RUN pip install "$TORCH_SPEC"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY loraloop ./loraloop
COPY generation ./generation
COPY bot ./bot
COPY training ./training
COPY console ./console
# With Ray ([service] backend = "ray", compose's ray profile): the same image runs the Ray head and workers.
RUN pip install '.[ray]'
COPY config.toml /app/config.toml

# Never run as root: the model cache and every database write belong to this user.
RUN useradd --create-home --uid 10001 loraloop \
    && mkdir -p /data \
    && chown loraloop:loraloop /data
USER loraloop
VOLUME ["/data"]
EXPOSE 8765

# Safe by default: the service listens on every interface, so it needs a token. Without
# LORALOOP_SERVICE_TOKEN, the first start writes a random one to /data/service_token (0600, in
# the volume), and every loraloop command in a container sharing the volume reads it from there.
# /healthz needs no token; a first start downloads the model, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8765/healthz || exit 1

ENV LORALOOP_CONFIG=/app/config.toml
CMD ["loraloop", "serve", "--host", "0.0.0.0"]
