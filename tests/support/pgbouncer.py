"""A throwaway PgBouncer (Debian's ``pgbouncer``) in front of throwaway clusters.

Started like the clusters: as the clusters' OS user when we are root (PgBouncer
refuses root), on a private port, removed by stop(). Clients log in with their own
passwords over TCP (SCRAM, checked against the server's pg_shadow through auth_query,
as a production pooler usually is); PgBouncer reaches each server over its socket.
``view()`` gives an object with a cluster's dsn()/uri() that point at the pooler, and
everything else (execute, create_database, the log) the cluster's own, so helpers
built on a cluster (tests.helpers.Server, Login) reach the pool unchanged.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg2

from tests.support.cluster import ThrowawayCluster, free_port

BINARY = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


class PgBouncer:
    """pool_mode "transaction" or "session"; routes: database name -> its cluster (the
    default cluster serves every other name)."""

    def __init__(self, default: ThrowawayCluster, pool_mode: str = "transaction", pool_size: int = 2,
                 routes: Mapping[str, ThrowawayCluster] | None = None, reset_query: str | None = None) -> None:
        if not Path(BINARY).exists():
            raise RuntimeError("pgbouncer is not installed: the README's test command installs Debian's pgbouncer")
        self.default = default
        self.routes = dict(routes or {})
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        #: session pooling's server_reset_query (None: PgBouncer's DISCARD ALL; "": none,
        #: so that whatever a client leaves on its session stays for the next)
        self.reset_query = reset_query
        self.port = free_port()
        #: the superuser's password at the pooler: the cluster's, or (a password-less server
        #: of PGQ_TEST_DSN that trusts us) one of its own, as SCRAM at the pooler needs one
        self.password = default.password or secrets.token_urlsafe(12)
        own = not default.shared
        self.os_user = (default.os_user if own else None) or ("postgres" if os.geteuid() == 0 else None)
        self.root = Path(tempfile.mkdtemp(prefix="pgq-bouncer-"))
        self.config = self.root / "pgbouncer.ini"
        self.logfile = self.root / "pgbouncer.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _server(self, cluster: ThrowawayCluster, dbname: str | None = None) -> str:
        """The server over its socket, or (a server of PGQ_TEST_DSN) as the tests reach it."""
        target = f" dbname={dbname}" if dbname else ""
        host = cluster.host if cluster.shared else cluster.sockdir
        return f"host={host} port={cluster.port}{target}"

    def _write_config(self) -> None:
        databases = [f"{name} = {self._server(c, name)}" for name, c in self.routes.items()]
        databases.append(f"* = {self._server(self.default)}")
        self.config.write_text("\n".join([
            "[databases]", *databases, "",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1", f"listen_port = {self.port}", f"unix_socket_dir = {self.root}",
            "auth_type = scram-sha-256", f"auth_file = {self.root / 'userlist.txt'}",
            f"auth_user = {self.default.superuser}",
            "auth_query = SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = $1",
            f"pool_mode = {self.pool_mode}", f"default_pool_size = {self.pool_size}",
            "max_client_conn = 500", f"admin_users = {self.default.superuser}",
            f"logfile = {self.logfile}", f"pidfile = {self.root / 'pgbouncer.pid'}",
            # round robin, not LIFO: a client's transactions land on every server session
            "server_round_robin = 1", "server_login_retry = 1", "query_wait_timeout = 60",
            *([f"server_reset_query = {self.reset_query}"] if self.reset_query is not None else []), "",
        ]))
        (self.root / "userlist.txt").write_text(f'"{self.default.superuser}" "{self.password}"\n')
        if self.os_user:
            entry = pwd.getpwnam(self.os_user)
            for path in (self.root, self.config, self.root / "userlist.txt"):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self) -> PgBouncer:
        self._write_config()
        self.proc = subprocess.Popen([BINARY, str(self.config)], user=self.os_user, cwd=str(self.root),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited at start:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"pgbouncer did not listen within 30 s:\n{self.log_tail()}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM: PgBouncer's immediate shutdown (every client and server connection
        closed at once); SIGKILL: a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, sig: signal.Signals = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def log_tail(self, n: int = 4000) -> str:
        return self.logfile.read_text(errors="replace")[-n:] if self.logfile.exists() else ""

    # -- clients -------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        user = user or self.default.superuser
        pw = self.password if password is None and user == self.default.superuser else password
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user}" + (f" password={pw}" if pw else "")

    def uri(self, dbname: str, user: str | None = None, password: str | None = None) -> str:
        user = user or self.default.superuser
        pw = self.password if password is None and user == self.default.superuser else password
        cred = quote(user, safe="") + (":" + quote(pw, safe="") if pw else "")
        return f"postgresql://{cred}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"

    def console(self, command: str) -> list[tuple[Any, ...]]:
        """One command on PgBouncer's admin console (SHOW SERVERS, KILL db, PAUSE db, ...)."""
        conn = psycopg2.connect(self.dsn("pgbouncer"))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(command)
                return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    def view(self, cluster: ThrowawayCluster | None = None) -> PooledCluster:
        return PooledCluster(self, cluster or self.default)


@contextmanager
def every_server_session(dsn: str, pool_size: int) -> Iterator[list[psycopg2.extensions.connection]]:
    """One plain client per server session of a pool (dsn through the pooler), each
    inside a transaction, so each holds a server session of its own until the block
    ends; then rolled back and closed."""
    conns = [psycopg2.connect(dsn) for _ in range(pool_size)]
    try:
        pids = set()
        for conn in conns:
            with conn.cursor() as cur:
                cur.execute("select pg_catalog.pg_backend_pid()")
                row = cur.fetchone()
                pids.add(row[0] if row else None)
        assert len(pids) == pool_size, f"{pool_size} clients got the server sessions {pids}"
        yield conns
    finally:
        for conn in conns:
            conn.rollback()
            conn.close()


def leave_settings(dsn: str, pool_size: int, settings: Mapping[str, str]) -> None:
    """What careless neighbours do: session-level settings on every server session of
    the pool of dsn's database and login."""
    with every_server_session(dsn, pool_size) as conns:
        for conn in conns:
            with conn.cursor() as cur:
                for name, value in settings.items():
                    cur.execute("select pg_catalog.set_config(%s, %s, false)", (name, value))
            conn.commit()
            with conn.cursor() as cur:  # inside a transaction again: keep this server session
                cur.execute("select 1")


class PooledCluster:
    """A cluster as its clients behind the pooler see it: dsn()/uri() through the
    pooler; the harness's own calls (execute, create_database, ...) direct."""

    def __init__(self, bouncer: PgBouncer, cluster: ThrowawayCluster) -> None:
        self.bouncer = bouncer
        self.cluster = cluster

    def dsn(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        return self.bouncer.dsn(dbname, user, password)

    def uri(self, dbname: str, user: str | None = None, password: str | None = None) -> str:
        return self.bouncer.uri(dbname, user, password)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cluster, name)
