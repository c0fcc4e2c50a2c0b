"""A real S3 server on 127.0.0.1 for tests (moto's server, in a process of its own: its web framework stays
out of the test process, where vLLM's in-process engine walks every loaded module), and the
`run.output_dir` URI of a bucket in it: credentials and endpoint travel in the URI, so every Ray node and
driver process reaches it without environment set-up."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

ACCESS = "test"  # moto takes any key


@contextmanager
def s3_server(timeout_s: float = 60.0) -> Iterator[str]:
    """Yields the server's host:port once it accepts connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on 127.0.0.1:{port}") from None
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


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
