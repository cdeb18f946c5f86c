"""Makes S3 buckets and objects in MiniStack with the administrator's
credentials (from the environment), for workloads to read or be refused.

Usage: seed_s3.py bucket/key [bucket/key ...]
"""

import sys

import boto3
from botocore.exceptions import ClientError


def main() -> int:
    s3 = boto3.session.Session().client("s3")
    for obj in sys.argv[1:]:
        bucket, key = obj.split("/", 1)
        try:
            s3.create_bucket(Bucket=bucket)
        except ClientError as err:
            if err.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        s3.put_object(Bucket=bucket, Key=key, Body=b"ephemera e2e")
    return 0


if __name__ == "__main__":
    sys.exit(main())
