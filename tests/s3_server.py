"""A real S3 server on 127.0.0.1 for tests (moto's server, in a thread of the test process), and the
`run.output_dir` URI of a bucket in it: credentials and endpoint travel in the URI, so every Ray node
and driver process reaches it without environment set-up."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

ACCESS = "test"  # moto takes any key


@contextmanager
def s3_server() -> Iterator[str]:
    """Yields the server's host:port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"{host}:{port}"
    finally:
        server.stop()


def filesystem(endpoint: str):
    import pyarrow.fs

    return pyarrow.fs.S3FileSystem(
        access_key=ACCESS,
        secret_key=ACCESS,
        endpoint_override=endpoint,
        scheme="http",
        region="us-east-1",
        allow_bucket_creation=True,
    )


def bucket_uri(endpoint: str, bucket: str, prefix: str = "runs") -> str:
    """A new bucket's `s3://` URI for run.output_dir."""
    filesystem(endpoint).create_dir(bucket)
    return f"s3://{ACCESS}:{ACCESS}@{bucket}/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def stored_files(endpoint: str, folder: str) -> dict[str, int]:
    """{path under `folder`: size} of the files in the store."""
    import pyarrow.fs

    listing = filesystem(endpoint).get_file_info(pyarrow.fs.FileSelector(folder, recursive=True, allow_not_found=True))
    return {
        entry.path[len(folder) :].lstrip("/"): entry.size for entry in listing if entry.type == pyarrow.fs.FileType.File
    }
