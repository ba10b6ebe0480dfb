"""A TCP proxy on 127.0.0.1 that counts round trips and queries (and can add latency).

A round trip is a turn of the conversation: the client sends after it heard from the
server (or at the start) and waits for the answer; the goodbye (Terminate) that closes
a connection waits for none and is not one. libpq waits for the answer to each message it sends (a
query, a step of the login), so the count is exact and repeatable: a COPY's stream
of data is one turn, however many blocks it takes; a query answered in many packets
is one turn. ``delay`` holds every block for that long in each direction, a network
of that round-trip time; counting does not depend on it. ``queries`` counts the
client's Query messages (one string, which may hold several statements).
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from types import TracebackType

from psycopg2.extensions import make_dsn, parse_dsn

_BLOCK = 1 << 16
#: Untyped requests a client may send before its startup message (SSL, GSS encryption).
_NEGOTIATION_CODES = (80877103, 80877104)


class _ClientMessages:
    """Splits what a client sends into protocol messages: untyped ones until the
    startup message, typed ones (1 byte type, 4 bytes length) after it."""

    def __init__(self) -> None:
        self._buffer = b""
        self._started = False

    def feed(self, data: bytes) -> list[bytes]:
        """The types of the messages completed by data: b"ssl"/b"gss" for a negotiation
        request, b"startup" for the startup message, else the message's type byte."""
        self._buffer += data
        types = []
        while True:
            if not self._started:
                if len(self._buffer) < 8:
                    return types
                length, code = struct.unpack("!ii", self._buffer[:8])
                if len(self._buffer) < length:
                    return types
                self._buffer = self._buffer[length:]
                self._started = code not in _NEGOTIATION_CODES
                types.append(b"startup" if self._started else (b"ssl" if code == _NEGOTIATION_CODES[0] else b"gss"))
                continue
            if len(self._buffer) < 5:
                return types
            kind, length = self._buffer[:1], struct.unpack("!i", self._buffer[1:5])[0]
            if len(self._buffer) < 1 + length:
                return types
            self._buffer = self._buffer[1 + length:]
            types.append(kind)


class CountingProxy:
    """Forwards 127.0.0.1:<port> to the server at (host, upstream_port); ``trips``
    counts every connection's round trips since the last reset()."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", delay: float = 0.0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay = delay  # one-way: a round trip takes twice this
        self._lock = threading.Lock()
        self._trips = 0
        self._queries = 0
        #: what the client sent in each counted turn (message types, e.g. "ssl", "startup",
        #: "p" for a login step, "Q" for a query, "X" for goodbye), since the last reset()
        self._turns: list[list[str]] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    @property
    def trips(self) -> int:
        with self._lock:
            return self._trips

    @property
    def queries(self) -> int:
        with self._lock:
            return self._queries

    def reset(self) -> int:
        """The round trips so far, and zero from now on (queries too)."""
        with self._lock:
            trips, self._trips, self._queries = self._trips, 0, 0
            self._turns = []
        return trips

    def turns(self) -> list[str]:
        """What the client sent in each round trip since the last reset(), one word a
        turn ("ssl", "startup", "p" (a login step), "Q", "Q X", ...), in order."""
        with self._lock:
            return [" ".join(turn) for turn in self._turns]

    def reset_both(self) -> tuple[int, int]:
        """(round trips, queries) so far, and zero from now on."""
        with self._lock:
            counts = (self._trips, self._queries)
            self._trips = self._queries = 0
            self._turns = []
        return counts

    def dsn(self, dsn: str) -> str:
        parts = parse_dsn(dsn)
        parts.update(host="127.0.0.1", port=str(self.port))
        return make_dsn(**parts)

    def start(self) -> CountingProxy:
        thread = threading.Thread(target=self._accept, name="counting-proxy", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopped.set()
        try:
            self._listener.close()
        except OSError:
            pass

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._pump, args=(client, server), daemon=True)
            thread.start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        client_turn_counted = False
        messages = _ClientMessages()
        try:
            while not self._stopped.is_set():
                ready, _, _ = select.select([client, server], [], [], 0.5)
                for sock in ready:
                    data = sock.recv(_BLOCK)
                    if not data:
                        return
                    if sock is client:
                        types = messages.feed(data)
                        goodbye = not client_turn_counted and types == [b"X"]  # waits for nothing
                        with self._lock:
                            if not client_turn_counted and not goodbye:
                                self._trips += 1
                                self._turns.append([])
                            self._queries += types.count(b"Q")
                            if self._turns and not goodbye:
                                self._turns[-1].extend(t.decode() for t in types)
                        client_turn_counted = not goodbye
                        peer = server
                    else:
                        client_turn_counted = False
                        peer = client
                    if self.delay:
                        time.sleep(self.delay)
                    peer.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            server.close()
