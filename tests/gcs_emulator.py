"""An in-process Google Cloud Storage emulator for tests (no network, no credentials)."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator

DEFAULT_BUCKET = "test-bucket"


@contextlib.contextmanager
def start_gcs_emulator(bucket: str = DEFAULT_BUCKET) -> Iterator[str]:
    """Run ``gcp-storage-emulator`` in memory on a free loopback port; yield its URL.

    Point the code under test at it with ``STORAGE_EMULATOR_HOST=<url>``. ``bucket``
    exists from the start.
    """
    from gcp_storage_emulator.server import create_server

    # The emulator logs every request at INFO; keep test output readable.
    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _free_port() -> int:
    # The emulator does not report the port it bound, so pick one the OS calls free.
    # Another process could take it before the emulator binds; on loopback in a test
    # run that race is remote enough to accept.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
