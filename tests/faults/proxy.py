"""A TCP proxy on 127.0.0.1 that fails the way real networks and servers do, quietly.

Put between the mover and a database (``proxy.dsn(server_dsn)`` rewrites host and
port), it forwards both directions and, on request:

- ``delay(s)``: holds every block for s seconds before passing it on (latency);
- ``throttle(bytes_per_s)``: passes at most that rate (a slow link);
- ``freeze()``: stops forwarding in both directions without closing anything, for
  existing and new connections alike (a stateful firewall that dropped the flow, a
  hung server, a half-open connection); the kernel still acknowledges, so TCP
  keepalives see nothing wrong. ``heal()`` lets the held data go on;
- ``cut()``: resets every connection now (RST);
- ``cut_at(n)``: resets every connection once n more bytes went from the server to
  the client (mid-row of a COPY, say).

Runs its own asyncio loop in a daemon thread; every control is thread-safe.
Loopback only: it never listens on or connects to anything else.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from psycopg2.extensions import make_dsn, parse_dsn

_BLOCK = 1 << 16


class FaultProxy:
    """One listening port in front of one (host, port) on loopback."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        if target_host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the fault proxy only forwards to loopback")
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._delay = 0.0
        self._rate: float | None = None
        self._cut_after: int | None = None
        self._flowing: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="fault-proxy", daemon=True)
        self.connections = 0
        self.forwarded = 0

    # -- life -------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start)
        return self

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if not self.loop.is_running():
            return
        self._call(self._stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

    async def _stop(self) -> None:
        assert self._server is not None and self._flowing is not None
        self._server.close()
        self._flowing.set()
        self._reset_all()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro(), self.loop).result(timeout=10)

    def dsn(self, dsn: str) -> str:
        """dsn with host and port pointing at the proxy."""
        parts = parse_dsn(dsn)
        parts.update(host="127.0.0.1", port=str(self.port))
        return make_dsn(**parts)

    # -- controls -----------------------------------------------------------------------

    def delay(self, seconds: float) -> None:
        self._delay = seconds

    def throttle(self, bytes_per_second: float | None) -> None:
        self._rate = bytes_per_second

    def freeze(self) -> None:
        self.loop.call_soon_threadsafe(self._freeze)

    def _freeze(self) -> None:
        assert self._flowing is not None
        self._flowing.clear()

    def heal(self) -> None:
        """Back to plain forwarding: no freeze, delay, throttle or pending cut."""
        self._delay = 0.0
        self._rate = None
        self._cut_after = None
        self.loop.call_soon_threadsafe(self._heal)

    def _heal(self) -> None:
        assert self._flowing is not None
        self._flowing.set()

    def cut(self) -> None:
        self.loop.call_soon_threadsafe(self._reset_all)

    def cut_at(self, nbytes: int) -> None:
        self._cut_after = nbytes

    def _reset_all(self) -> None:
        for writer in list(self._writers):
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()
        self._writers.clear()

    # -- forwarding -----------------------------------------------------------------------

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self.connections += 1
        await self._flowing.wait()  # a frozen network connects nothing either
        try:
            server_r, server_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        self._writers.update((client_w, server_w))
        await asyncio.gather(
            self._pipe(client_r, server_w, to_client=False),
            self._pipe(server_r, client_w, to_client=True),
            return_exceptions=True,
        )
        for w in (client_w, server_w):
            self._writers.discard(w)
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, to_client: bool) -> None:
        assert self._flowing is not None
        while True:
            data = await reader.read(_BLOCK)
            if not data:
                await self._flowing.wait()
                if writer.can_write_eof():
                    writer.write_eof()
                return
            await self._flowing.wait()
            if self._delay:
                await asyncio.sleep(self._delay)
            if self._rate:
                await asyncio.sleep(len(data) / self._rate)
            await self._flowing.wait()
            if writer.transport.is_closing():
                return
            if to_client and self._cut_after is not None:
                if len(data) >= self._cut_after:
                    writer.write(data[: self._cut_after])
                    self._cut_after = None
                    await writer.drain()
                    self._reset_all()
                    return
                self._cut_after -= len(data)
            writer.write(data)
            self.forwarded += len(data)
            await writer.drain()
