"""S3 fixtures: moto's S3 server on 127.0.0.1 (real HTTP), fake credentials, one bucket."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from s3_server import ACCESS_KEY, BUCKET, SECRET_KEY, MotoS3

from vlray.config import S3Config


@dataclass
class S3Env:
    """A running moto S3 server, its settings and an s3fs client for test setup and checks."""

    server: MotoS3
    s3: S3Config
    fs: Any
    bucket: str

    def config(self, **changes: Any) -> S3Config:
        """The job's S3Config, optionally pointed at another endpoint (a proxy)."""
        from dataclasses import replace

        return replace(self.s3, **changes)


@pytest.fixture(scope="session")
def s3_env():
    import boto3
    import s3fs

    server = MotoS3().start()
    s3 = S3Config(endpoint_url=server.url, region="us-east-1", key=ACCESS_KEY, secret=SECRET_KEY)
    fs = s3fs.S3FileSystem(
        key=ACCESS_KEY,
        secret=SECRET_KEY,
        endpoint_url=server.url,
        client_kwargs={"region_name": "us-east-1"},
        skip_instance_cache=True,
        use_listings_cache=False,
    )
    boto3.client(
        "s3",
        endpoint_url=server.url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    ).create_bucket(Bucket=BUCKET)
    yield S3Env(server=server, s3=s3, fs=fs, bucket=BUCKET)
    server.stop()
