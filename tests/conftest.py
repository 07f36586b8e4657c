"""What every test shares."""

import os
from collections.abc import Iterator

import pytest

# After each command DVC starts a background process that posts usage analytics, and leaves its
# report in the temporary folder when the post fails (this machine has no network). The suite
# runs a few hundred dvc commands; none of them should phone home.
os.environ["DVC_NO_ANALYTICS"] = "1"


S3_BUCKET = "classmatrix-remote"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, standing in for the team's bucket (S3_BUCKET, made empty;
    S3_KEYS sign for it); yields its URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url, aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"], region_name=S3_KEYS["AWS_DEFAULT_REGION"]).create_bucket(Bucket=S3_BUCKET)
    yield url
    server.stop()
