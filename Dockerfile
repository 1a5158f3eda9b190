# koprs-bridge container image.
#
#   docker build -t koprs-bridge .
#   docker run --rm -v "$PWD/bridge.yaml:/etc/koprs-bridge/bridge.yaml:ro" -p 8080:8080 koprs-bridge
#
# Stage 1 builds the wheel and installs it, with the s3, fast and otel extras, into a
# virtual environment; stage 2 copies only that environment onto a clean slim image. The
# final image has no compiler, no build backend and no pip in the environment, runs as the
# unprivileged uid/gid 10001 and works with a read-only root filesystem. It uses no BuildKit-only
# syntax, so it has no `# syntax=` line: that line makes BuildKit fetch a frontend image from a
# registry. Without a registry, scripts/compose-e2e builds it on a local Python image.

ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas/ schemas/
COPY bridge/ bridge/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .
# The extras: s3 (aioboto3), fast (orjson), otel (OpenTelemetry SDK and OTLP exporter).
RUN python -m venv /opt/koprs-bridge \
    && wheel="$(find /dist -name 'koprs_bridge-*.whl' -print -quit)" \
    && /opt/koprs-bridge/bin/pip install --no-cache-dir "${wheel}[s3,fast,otel]" \
    && /opt/koprs-bridge/bin/pip uninstall --yes pip \
    && /opt/koprs-bridge/bin/koprs-bridge --help > /dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="koprs-bridge" \
      org.opencontainers.image.description="Polls external sources and publishes their changes as CloudEvents to NATS JetStream or Redis Streams" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH="/opt/koprs-bridge/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 koprs \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin koprs \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/koprs-bridge \
    && install -d -m 0755 /etc/koprs-bridge
COPY --from=builder /opt/koprs-bridge /opt/koprs-bridge
WORKDIR /var/lib/koprs-bridge
USER 10001:10001
# The operations server (server.port in the config): /healthz, /readyz, /metrics.
EXPOSE 8080
ENTRYPOINT ["koprs-bridge"]
CMD ["run", "--config", "/etc/koprs-bridge/bridge.yaml"]
