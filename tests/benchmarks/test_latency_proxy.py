"""The benchmark's latency-injecting proxy: loopback only, adds its latency to every request, counts what passes."""

import importlib.util
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "latency_proxy.py"
_spec = importlib.util.spec_from_file_location("latency_proxy", _PATH)
latency_proxy = importlib.util.module_from_spec(_spec)
sys.modules["latency_proxy"] = latency_proxy  # its dataclass looks its module up there
_spec.loader.exec_module(latency_proxy)


@pytest.fixture
def http_server():
    """A real one-response-per-request HTTP server on 127.0.0.1 (keep-alive), stopped afterwards."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve_one(conn):
        with conn:
            buffer = b""
            while not stop.is_set():
                data = conn.recv(4096)
                if not data:
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:
                    _, buffer = buffer.split(b"\r\n\r\n", 1)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


@pytest.mark.parametrize("host", ["10.0.0.1", "8.8.8.8", "0.0.0.0", "192.168.1.20"])
def test_proxy_refuses_non_loopback_targets(host):
    with pytest.raises(ValueError, match="loopback"):
        latency_proxy.LatencyProxy(host, 80)


def test_proxy_refuses_to_listen_off_loopback(http_server):
    with pytest.raises(ValueError, match="loopback"):
        latency_proxy.LatencyProxy("127.0.0.1", http_server, listen_host="0.0.0.0")


def test_proxy_adds_latency_to_each_request_and_counts_them(http_server):
    latency = 0.15
    with latency_proxy.LatencyProxy("localhost", http_server, latency_s=latency, max_connections=4) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as conn:
            for _ in range(3):  # one connection, three requests: each pays the latency
                t0 = time.perf_counter()
                conn.sendall(b"GET /k HTTP/1.1\r\nHost: x\r\n\r\n")
                reply = b""
                while not reply.endswith(b"hello"):
                    reply += conn.recv(4096)
                assert time.perf_counter() - t0 >= latency
                assert reply.startswith(b"HTTP/1.1 200 OK")
        stats = proxy.stats
    assert stats.requests == 3
    assert stats.connections == 1
    assert stats.bytes_to_client == 3 * len(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")


def test_proxy_stops_by_itself_after_its_lifetime(http_server):
    proxy = latency_proxy.LatencyProxy("127.0.0.1", http_server, latency_s=0, lifetime_s=0.3).start()
    proxy._thread.join()  # returns only because the proxy stopped itself
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
