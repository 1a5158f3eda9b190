# A Python image from Debian's packages, standing in for python:3.12-slim where no registry is
# reachable (scripts/compose-e2e). BASE_IMAGE: a Debian image made with debootstrap. pip reaches
# PyPI through this machine's TLS-inspecting proxy, so its CA bundle (ca-bundle.crt, copied from
# the host) is trusted; builds from this image run with --network host.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 python3-venv python3-pip python-is-python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY ca-bundle.crt /usr/local/share/koprs-local/ca-bundle.crt
ENV PIP_CERT=/usr/local/share/koprs-local/ca-bundle.crt \
    PIP_DEFAULT_TIMEOUT=180 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
