"""A TCP proxy on 127.0.0.1 that adds a fixed latency to every HTTP request: object storage's round trip, locally.

Real S3 answers a request after 10-50 ms whatever its size; moto on 127.0.0.1 answers in well under 1 ms, which
hides what a loader pays per request. ``benchmarks/loader_throughput.py`` puts this proxy between the loaders and
moto. It only ever listens on and forwards to loopback addresses (a benchmark must not become an open relay), holds
at most ``max_connections`` client connections at once (more wait their turn), and stops by itself after
``lifetime_s`` even if its owner forgets.

A request is counted (and delayed) when a client sends bytes that begin an HTTP request line (``GET ``, ``PUT ``, ...)
on its connection; the bytes each way are counted too, for the benchmark's requests and bytes per cell.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from dataclasses import dataclass

_METHODS = (b"GET ", b"HEAD ", b"PUT ", b"POST ", b"DELETE ", b"PATCH ", b"OPTIONS ")


def loopback_address(host: str) -> str:
    """Returns the loopback IP address ``host`` names.

    Raises:
        ValueError: ``host`` is not a loopback address, or a name that resolves to anything but loopback.
    """
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except socket.gaierror as err:
        raise ValueError(f"latency proxy: cannot resolve {host!r} ({err}); only loopback targets are allowed") from err
    bad = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if bad or not addresses:
        raise ValueError(f"latency proxy: {host!r} is not a loopback address ({', '.join(bad)}); it only listens on "
                         "and forwards to 127.0.0.1 / ::1")
    return sorted(addresses)[0]


@dataclass
class ProxyStats:
    """What went through the proxy."""

    requests: int = 0
    """HTTP requests the clients started."""

    bytes_to_server: int = 0
    """Bytes forwarded from the clients to the target."""

    bytes_to_client: int = 0
    """Bytes forwarded from the target to the clients (what the loaders read)."""

    connections: int = 0
    """Client connections accepted."""


class LatencyProxy:
    """Forwards ``127.0.0.1:<port>`` to a loopback ``target_host:target_port``, delaying each request."""

    def __init__(self, target_host: str, target_port: int, *, latency_s: float = 0.02, max_connections: int = 256,
                 lifetime_s: float = 3600.0, listen_host: str = "127.0.0.1") -> None:
        """Args:
            target_host: the server to forward to; must be loopback.
            target_port: its port.
            latency_s: delay added before each request is forwarded.
            max_connections: client connections served at once; more wait.
            lifetime_s: the proxy stops by itself after this long.
            listen_host: where to listen; must be loopback.

        Raises:
            ValueError: a non-loopback target or listen address, or a negative latency / non-positive bound.
        """
        if latency_s < 0 or max_connections < 1 or lifetime_s <= 0:
            raise ValueError(f"latency proxy: needs latency_s >= 0, max_connections >= 1 and lifetime_s > 0, got "
                             f"{latency_s}, {max_connections}, {lifetime_s}")
        self._target = (loopback_address(target_host), int(target_port))
        self._listen = loopback_address(listen_host)
        self.latency_s = float(latency_s)
        self.max_connections = int(max_connections)
        self.lifetime_s = float(lifetime_s)
        self.stats = ProxyStats()
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>`` of the running proxy."""
        return f"http://{self._listen}:{self.port}"

    def start(self) -> LatencyProxy:
        """Starts serving in a daemon thread; returns once the port is bound."""
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, failure), name="latency-proxy", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stops serving and closes every connection (idempotent)."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join()

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self, ready: threading.Event, failure: list) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve(ready))
        except BaseException as err:  # noqa: BLE001 - handed to the thread that called start()
            failure.append(err)
            ready.set()
        finally:
            self._loop.close()

    async def _serve(self, ready: threading.Event) -> None:
        self._stopped = asyncio.Event()
        slots = asyncio.Semaphore(self.max_connections)
        tasks: set[asyncio.Task] = set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            tasks.add(asyncio.current_task())
            try:
                async with slots:
                    self.stats.connections += 1
                    await self._forward(reader, writer)
            finally:
                tasks.discard(asyncio.current_task())

        server = await asyncio.start_server(handle, self._listen, 0)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        try:
            await asyncio.wait_for(self._stopped.wait(), self.lifetime_s)
        except asyncio.TimeoutError:
            pass  # its lifetime is over: stop by itself
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def _forward(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self._target)
        except OSError:
            client_w.close()
            return

        async def upstream() -> None:
            while data := await client_r.read(1 << 16):
                if data.startswith(_METHODS):
                    self.stats.requests += 1
                    if self.latency_s:
                        await asyncio.sleep(self.latency_s)
                self.stats.bytes_to_server += len(data)
                server_w.write(data)
                await server_w.drain()
            if server_w.can_write_eof():  # the client is done sending: let the server see it
                server_w.write_eof()

        async def downstream() -> None:
            while data := await server_r.read(1 << 16):
                self.stats.bytes_to_client += len(data)
                client_w.write(data)
                await client_w.drain()

        try:
            await asyncio.gather(upstream(), downstream())
        except (ConnectionError, OSError):
            pass  # either side hung up: close both
        finally:
            for w in (client_w, server_w):
                w.close()
