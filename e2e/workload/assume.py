"""A stand-in for an application pod: assume the injected role with the AWS SDK.

It uses nothing but what ephemera injects into a pod: AWS_ROLE_ARN,
AWS_WEB_IDENTITY_TOKEN_FILE, AWS_ROLE_SESSION_NAME, AWS_REGION and
AWS_DEFAULT_REGION (botocore reads only the latter), plus AWS_ENDPOINT_URL
pointing at the emulator. boto3's default credential chain reads them the
way every AWS SDK does, so a success here is what an application would see.

With E2E_S3_OBJECTS="bucket/key,bucket/key" it also reads each object with
the assumed identity and reports "ok" or the error code per object.

Prints one JSON line: {"ok": true, "arn": ..., "s3": {...}} or
{"ok": false, "error": code}. Exit status 0 when the identity works, 1 when
AWS refused it.
"""

import json
import os
import sys

import boto3
from botocore.exceptions import BotoCoreError, ClientError


def main() -> int:
    session = boto3.session.Session()
    try:
        identity = session.client("sts").get_caller_identity()
    except ClientError as err:
        print(json.dumps({"ok": False, "error": err.response["Error"]["Code"]}))
        return 1
    except BotoCoreError as err:
        print(json.dumps({"ok": False, "error": type(err).__name__, "message": str(err)}))
        return 1
    s3 = {}
    objects = [o for o in os.environ.get("E2E_S3_OBJECTS", "").split(",") if o]
    if objects:
        client = session.client("s3")
        for obj in objects:
            bucket, key = obj.split("/", 1)
            try:
                client.get_object(Bucket=bucket, Key=key)["Body"].read()
                s3[obj] = "ok"
            except ClientError as err:
                s3[obj] = err.response["Error"]["Code"]
    print(json.dumps({"ok": True, "arn": identity["Arn"], "s3": s3}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
