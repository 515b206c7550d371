"""A real S3 API server for the tests: moto's ThreadedMotoServer on a free port of 127.0.0.1, as
Ray's own storage tests start it (ray/_private/test_utils.py::simulate_storage), with IAM checks
on, so that missing credentials and a read-only user are refused as a real bucket refuses them."""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

BUCKET = "tuning-runs"
READ_ONLY_POLICY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"], "Resource": "*"}]}
FULL_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3:
    endpoint: str  # http://127.0.0.1:PORT
    writer: dict[str, str]  # AWS_* variables of a user who may do anything
    reader: dict[str, str]  # of a user who may only read

    def storage(self, bucket: str = BUCKET, prefix: str = "runs") -> str:
        host = self.endpoint.removeprefix("http://")
        return f"s3://{bucket}/{prefix}?endpoint_override={host}&scheme=http&region=us-east-1"

    def env(self, who: dict[str, str] | None = None, **more: str) -> dict[str, str]:
        """This process's environment with `who`'s credentials (default: the writer's) and no other."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        return {**env, "AWS_EC2_METADATA_DISABLED": "true", **(self.writer if who is None else who), **more}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.writer["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.writer["AWS_SECRET_ACCESS_KEY"])

    def objects(self, bucket: str = BUCKET) -> dict[str, str]:
        """Every key in the bucket and its ETag: what a test compares to see nothing overwritten."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}

    def keys(self, prefix: str = "", bucket: str = BUCKET) -> list[str]:
        return sorted(k for k in self.objects(bucket) if k.startswith(prefix))


def start() -> tuple[object, S3]:
    """The server (call .stop()) and its users; the bucket exists, IAM is enforced from here on."""
    import boto3
    from moto.server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # set up while moto lets everything through, then turn its IAM checks on
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="setup", aws_secret_access_key="setup")
    users = {}
    for name, policy in (("writer", FULL_POLICY), ("reader", READ_ONLY_POLICY)):
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=name, PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        users[name] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                 aws_secret_access_key="setup").create_bucket(Bucket=BUCKET)
    enforce_iam()
    return server, S3(endpoint, users["writer"], users["reader"])


def enforce_iam() -> None:
    """What moto's /moto-api/reset-auth does, in this process where the server's thread runs."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    ActionAuthenticatorMixin.request_count = 0
