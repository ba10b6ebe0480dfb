"""A throwaway PostgreSQL cluster with PgQ, for the tests, the demo and the benchmarks.

initdb in a temporary folder, a private port on 127.0.0.1 and a private socket
folder, run as an unprivileged OS user when we are root (PostgreSQL refuses root),
removed again by stop(). Password login over TCP, trust over the socket.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql

SUPERUSER = "pgq_test_admin"


def find_bindir() -> Path:
    """PG_BINDIR, else the newest /usr/lib/postgresql/N/bin whose N has PgQ installed."""
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[4]), reverse=True):
        major = bindir.split("/")[4]
        if Path(f"/usr/share/postgresql/{major}/extension/pgq.control").exists():
            return Path(bindir)
    raise RuntimeError(
        "no PostgreSQL with the PgQ extension found: install postgresql-<major>-pgq3"
        " (the README's test command does), or set PG_BINDIR"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def memory_dir() -> str | None:
    """A RAM-backed folder (/dev/shm) with room for a test cluster, else None.

    File creation dominates CREATE DATABASE (one file per relation of the template):
    ~350 ms on this CI's ext4 (mounted with discard), ~30 ms on tmpfs; the suite
    creates some 600 databases. PGQ_TEST_TMPDIR overrides the choice ("" = the
    system's temporary folder)."""
    if "PGQ_TEST_TMPDIR" in os.environ:
        return os.environ["PGQ_TEST_TMPDIR"] or None
    shm = "/dev/shm"  # noqa: S108 - a private mkdtemp folder inside it
    try:
        st = os.statvfs(shm)
    except OSError:
        return None
    return shm if os.access(shm, os.W_OK) and st.f_bavail * st.f_frsize >= 4 << 30 else None


class ThrowawayCluster:
    """in_memory=True puts the cluster in memory_dir() when there is one (the tests
    do; the benchmarks and the demo keep the disk, whose numbers they report)."""

    #: the superuser the tests log in as (a server of PGQ_TEST_DSN: the DSN's user)
    superuser: str = SUPERUSER
    #: where the tests reach the server over TCP
    host: str = "127.0.0.1"
    #: whether a wrong password is refused (a server of PGQ_TEST_DSN may trust TCP logins)
    checks_passwords: bool = True
    #: PostgreSQL's major version, e.g. 15
    major: int
    #: a server the tests share (PGQ_TEST_DSN), not a cluster of their own
    shared: bool = False

    def __init__(self, os_user: str = "postgres", in_memory: bool = False, superuser: str = SUPERUSER,
                 trust: bool = False) -> None:
        """superuser: its name; trust: no password at all (TCP logins trusted), as a
        server a user may name with PGQ_TEST_DSN (the harness's own tests use it)."""
        self.superuser = superuser
        self.trust = trust
        self.bindir = find_bindir()
        self.major = int(self.bindir.parts[-2]) if self.bindir.parts[-2].isdigit() else 0
        self.os_user = os_user if os.geteuid() == 0 else None
        self.password = "" if trust else secrets.token_urlsafe(12)
        self.port = free_port()
        self.in_memory = bool(in_memory and memory_dir())
        self.root = Path(tempfile.mkdtemp(prefix="pgq-cluster-", dir=memory_dir() if self.in_memory else None))
        self.datadir = self.root / "data"
        self.sockdir = self.root / "sock"
        self.logfile = self.root / "server.log"

    # -- process control ------------------------------------------------------

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            user=self.os_user, check=check, capture_output=True, text=True,
            cwd=str(self.root),
        )

    def start(self) -> ThrowawayCluster:
        self.sockdir.mkdir()
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self.os_user:
            entry = pwd.getpwnam(self.os_user)
            for path in (self.root, self.sockdir, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        password = [] if self.trust else [f"--pwfile={pwfile}"]
        self._run(
            "initdb", "-D", str(self.datadir), "-U", self.superuser, *password, "--auth-local=trust",
            f"--auth-host={'trust' if self.trust else 'scram-sha-256'}", "-E", "UTF8", "--locale=C.UTF-8",
        )
        pwfile.unlink()
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.sockdir}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 200\nshared_buffers = 256MB\n"
                # in memory, WAL is RAM: checkpoints (cheap without fsync) recycle it sooner
                f"max_wal_size = {'1GB' if self.in_memory else '4GB'}\n"
            )
        self.pg_ctl("start")
        return self

    def pg_ctl(self, action: str, mode: str = "fast") -> None:
        args = ["pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "60"]
        if action in ("stop", "restart"):
            args += ["-m", mode]
        self._run(*args, action)

    def kill9(self) -> None:
        """SIGKILL to the postmaster: a crash. Its backends notice and exit on their own."""
        pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)

    def start_after_crash(self, timeout: float = 60.0) -> float:
        """Starts the server again (crash recovery from its WAL) once the last orphaned
        backend has let go of shared memory; returns the seconds that took."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            try:
                self.pg_ctl("start")
                return time.monotonic() - started
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.datadir.exists():
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- access -----------------------------------------------------------------

    def dsn(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        user = user or self.superuser
        pw = self.password if password is None and user == self.superuser else password
        parts = [f"host={self.host} port={self.port} dbname={dbname} user={user}"]
        if pw:
            parts.append(f"password={pw}")
        return " ".join(parts)

    def uri(self, dbname: str, user: str | None = None, password: str | None = None) -> str:
        from urllib.parse import quote

        user = user or self.superuser
        pw = self.password if password is None and user == self.superuser else password
        cred = quote(user, safe="") + (":" + quote(pw, safe="") if pw else "")
        return f"postgresql://{cred}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def execute(self, dbname: str, query: Any, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Runs one statement in autocommit and returns its rows (if any)."""
        conn = psycopg2.connect(self.dsn(dbname))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(query, params)
                return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    def create_database(self, name: str, template: str = "template1") -> None:
        self.execute(
            "postgres",
            sql.SQL("create database {} template {}").format(sql.Identifier(name), sql.Identifier(template)),
        )

    def drop_database(self, name: str) -> None:
        self.execute("postgres", sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def wait_until(predicate: Any, timeout: float = 30.0, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return bool(predicate())
