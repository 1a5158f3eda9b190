"""Make the local stack's bucket and write or delete objects in it (the ``s3-init`` service).

    python s3_put.py [--bucket NAME] [--put-if-missing KEY TEXT]... [--put KEY TEXT]...
                     [--delete KEY]...

The bucket (``--bucket``, default ``$S3_BUCKET``) is created if it does not exist, then each
action runs in order. ``--put-if-missing`` leaves an existing object alone, so the one-shot
service can run at every ``docker compose up`` without changing what the bridge already
announced. The server and credentials come from ``S3_ENDPOINT_URL``, ``S3_ACCESS_KEY_ID`` and
``S3_SECRET_ACCESS_KEY``; the server may still be starting, so the first request is retried
for up to a minute.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import boto3
from botocore.exceptions import ClientError, EndpointConnectionError

_READY_TIMEOUT_S = 60.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bucket", default=os.environ.get("S3_BUCKET", ""))
    parser.add_argument(
        "--put-if-missing",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "TEXT"),
        dest="actions_put_if_missing",
    )
    parser.add_argument("--put", nargs=2, action="append", default=[], metavar=("KEY", "TEXT"))
    parser.add_argument("--delete", action="append", default=[], metavar="KEY")
    args = parser.parse_args()
    if not args.bucket:
        parser.error("no bucket: give --bucket or set S3_BUCKET")
    client = boto3.client(
        "s3",
        endpoint_url=os.environ["S3_ENDPOINT_URL"],
        aws_access_key_id=os.environ["S3_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["S3_SECRET_ACCESS_KEY"],
        region_name=os.environ.get("S3_REGION", "us-east-1"),
    )
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while True:
        try:
            existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            break
        except (EndpointConnectionError, ClientError) as exc:
            if time.monotonic() > deadline:
                print(f"s3_put: the S3 server does not answer: {exc}", file=sys.stderr)
                return 1
            time.sleep(1)
    if args.bucket not in existing:
        client.create_bucket(Bucket=args.bucket)
        print(f"created bucket {args.bucket}")
    for key, text in args.actions_put_if_missing:
        try:
            client.head_object(Bucket=args.bucket, Key=key)
            print(f"kept {args.bucket}/{key}")
            continue
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise
        client.put_object(Bucket=args.bucket, Key=key, Body=text.encode() + b"\n")
        print(f"put {args.bucket}/{key}")
    for key, text in args.put:
        client.put_object(Bucket=args.bucket, Key=key, Body=text.encode() + b"\n")
        print(f"put {args.bucket}/{key}")
    for key in args.delete:
        client.delete_object(Bucket=args.bucket, Key=key)
        print(f"deleted {args.bucket}/{key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
