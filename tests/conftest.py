"""Fixtures shared by every test directory."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import pytest


@dataclass
class S3Server:
    """A real S3-compatible server (moto's server mode) listening on 127.0.0.1."""

    endpoint_url: str
    key: str = "testing"
    secret: str = "testing"
    region: str = "us-east-1"

    def storage_options(self) -> dict:
        """fsspec/s3fs options that reach this server."""
        return {"key": self.key, "secret": self.secret, "client_kwargs": {"endpoint_url": self.endpoint_url}}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """Starts moto's S3 server on a free loopback port for the session; stops it afterwards."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    finally:
        server.stop()
