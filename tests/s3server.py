"""A real S3 server on loopback for the tests, the benchmark and `scripts/s3.sh`: moto's server (the same HTTP API
as AWS S3: signed requests, conditional writes, bucket policies when IAM is enforced) in a thread of this process.

    with S3Server() as s3:                # http://127.0.0.1:<port>, credentials in s3.env
        s3.bucket("features")
        os.environ.update(s3.env)         # what `alf` reads: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
        s3.stop(); s3.start()             # the same objects come back on the same port (state lives in-process)
"""
from __future__ import annotations

import logging
import socket


class S3Server:
    def __init__(self, port: int = 0):
        self.port = port or _free_port()
        self.server = None
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "alf-test",
                    "AWS_SECRET_ACCESS_KEY": "alf-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}

    @property
    def endpoint(self) -> str:
        return self.env["AWS_ENDPOINT_URL"]

    def start(self) -> "S3Server":
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def client(self, **creds):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=creds.get("key", self.env["AWS_ACCESS_KEY_ID"]),
                            aws_secret_access_key=creds.get("secret", self.env["AWS_SECRET_ACCESS_KEY"]))

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
