# redis-server from Debian's package on the local Debian image: REDIS_IMAGE without a registry.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && install -d /data
WORKDIR /data
EXPOSE 6379
CMD ["redis-server"]
