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

A connection is always torn down whole: once either side is gone (it closed, was
reset, or a cut struck), the other side is closed too. While frozen, a client that
gives up (its socket closes behind the frozen network) takes the server side with
it at once: the proxy is a network, and a network that forgot a flow does not keep
a server session alive for a client that no longer exists. (It used to keep it:
the server backend then sat in COPY for as long as the proxy ran, holding the
tracking key's lock.) A server that goes away while frozen is told to the client
only when the network heals (or the client gives up first), as a frozen network would.
With ``hold_server=True`` the proxy keeps the old behaviour on purpose: a middlebox
that keeps a dead client's server connection alive (and answers the server's
keepalives), for the tests of what the product does about such a holder.

Runs its own asyncio loop in a daemon thread; every control is thread-safe.
Loopback only: it never listens on or connects to anything else.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Any

from psycopg2.extensions import make_dsn, parse_dsn

_BLOCK = 1 << 16
#: Linux tcp_states: the first byte of TCP_INFO.
_TCP_ESTABLISHED = 1
#: How often a frozen connection looks whether its client is still there.
_POLL = 0.05


def _peer_gone(writer: asyncio.StreamWriter) -> bool:
    """Whether the client of this connection has closed or reset it.

    Our own socket's TCP state shows a FIN or RST that arrived; but a client that
    closes while its send buffer still holds data the frozen proxy does not read
    queues its FIN behind that data, which never comes. Both ends are on loopback,
    so the kernel's table tells the client socket's own state: gone, or no longer
    ESTABLISHED (FIN_WAIT1 with the data still queued: its process closed it)."""
    if writer.transport.is_closing():
        return True
    sock = writer.get_extra_info("socket")
    if sock is None:
        return True
    try:
        state = struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]
        ours, theirs = sock.getsockname(), sock.getpeername()
    except OSError:
        return True
    if state != _TCP_ESTABLISHED:
        return True
    return _loopback_state(theirs, ours) != _TCP_ESTABLISHED  # None: the client socket is gone


def _hex_endpoint(addr: tuple[str, int]) -> str:
    """An IPv4 address and port as /proc/net/tcp writes them (address bytes little-endian)."""
    packed = socket.inet_aton(addr[0])
    return f"{struct.unpack('<I', packed)[0]:08X}:{addr[1]:04X}"


def _loopback_state(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The TCP state of the socket local -> remote in this network namespace, None if
    there is none."""
    want = (_hex_endpoint(local), _hex_endpoint(remote))
    try:
        with open("/proc/net/tcp") as table:
            next(table)
            for line in table:
                fields = line.split()
                if (fields[1], fields[2]) == want:
                    return int(fields[3], 16)
    except (OSError, StopIteration, ValueError, IndexError):
        return _TCP_ESTABLISHED  # cannot tell: assume it is still there
    return None


class FaultProxy:
    """One listening port in front of one (host, port) on loopback."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", hold_server: bool = False) -> None:
        if target_host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the fault proxy only forwards to loopback")
        self.target_host = target_host
        self.target_port = target_port
        self.hold_server = hold_server
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._delay = 0.0
        self._rate: float | None = None
        self._cut_after: int | None = None
        self._flowing: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
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
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

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
        self._writers.add(client_w)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            # a frozen network connects nothing either; a client that gave up meanwhile
            # gets no server session
            while not self._flowing.is_set():
                if _peer_gone(client_w):
                    return
                await asyncio.sleep(_POLL)
            try:
                server_r, server_w = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                return
            self._writers.add(server_w)
            try:
                await self._forward(client_r, client_w, server_r, server_w)
            finally:
                self._close(server_w)
        finally:
            self._close(client_w)
            if task is not None:
                self._handlers.discard(task)

    async def _forward(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                       server_r: asyncio.StreamReader, server_w: asyncio.StreamWriter) -> None:
        """Both directions until either ends (its side closed or reset, or a cut), or
        until the client is gone behind a frozen network."""
        assert self._flowing is not None
        pipes = {
            asyncio.ensure_future(self._pipe(client_r, server_w, to_client=False)),
            asyncio.ensure_future(self._pipe(server_r, client_w, to_client=True)),
        }
        try:
            while True:
                pending = {pipe for pipe in pipes if not pipe.done()}
                if not pending or (len(pending) < len(pipes) and not self.hold_server):
                    return
                if not self._flowing.is_set() and not client_w.transport.is_closing() and _peer_gone(client_w):
                    if not self.hold_server:
                        return
                    client_w.transport.abort()  # the held server side stays until stop()
                await asyncio.wait(pending, timeout=_POLL, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)

    def _close(self, writer: asyncio.StreamWriter) -> None:
        """Closes one side: flushes what was already passed on, unless a reset is due."""
        self._writers.discard(writer)
        if not writer.transport.is_closing():
            writer.transport.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, to_client: bool) -> None:
        assert self._flowing is not None
        while True:
            data = await reader.read(_BLOCK)
            if not data:
                if not to_client and self.hold_server:
                    return  # the held server side hears nothing of the client's end
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
