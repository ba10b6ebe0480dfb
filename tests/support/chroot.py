"""A throwaway PostgreSQL cluster of another major version, from Debian's packages in a
debootstrap chroot that scripts/setup-env made (trixie: 17, forky: 18; cached under
PGQ_CHROOTS, default /var/cache/pgq-chroots).

The server runs inside the chroot as the chroot's user postgres, on a private port on
127.0.0.1 (password login over TCP, as a ThrowawayCluster); the tests reach it from
this machine like any remote server. Its files live in a folder inside the chroot
(a tmpfs mounted there when in_memory and we are root), whose host-side paths
`datadir`, `sockdir` and `logfile` name: the socket works from outside the chroot too.

`ChrootCluster(17)` raises ChrootMissing when the chroot is absent or lacks the
version: a version tier never skips silently.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.cluster import SUPERUSER, ThrowawayCluster, find_bindir, free_port

#: Debian release that packages each PostgreSQL major version (scripts/setup-env)
RELEASES = {17: "trixie", 18: "forky"}


class ChrootMissing(RuntimeError):
    pass


def chroots_dir() -> Path:
    return Path(os.environ.get("PGQ_CHROOTS") or "/var/cache/pgq-chroots")


def chroot_for(major: int) -> Path:
    """The chroot that has PostgreSQL `major` with PgQ, or ChrootMissing saying how to make it."""
    release = RELEASES.get(major)
    if release is None:
        raise ChrootMissing(f"no Debian release is known for PostgreSQL {major} (known: {sorted(RELEASES)})")
    root = chroots_dir() / release
    for need in (f"usr/lib/postgresql/{major}/bin/postgres", f"usr/share/postgresql/{major}/extension/pgq.control"):
        if not (root / need).exists():
            raise ChrootMissing(
                f"PostgreSQL {major} is not available: {root / need} is missing; make the {release} chroot with"
                f" PGQ_VERSIONS={major} bash scripts/setup-env (as root)"
            )
    return root


def _chroot_ids(root: Path, name: str = "postgres") -> tuple[int, int]:
    """The chroot's own uid and gid of `name` (they need not match this machine's)."""
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise ChrootMissing(f"the chroot {root} has no user {name!r}")


class ChrootCluster(ThrowawayCluster):
    """A ThrowawayCluster of PostgreSQL `major` inside its chroot (same interface)."""

    def __init__(self, major: int, in_memory: bool = False) -> None:  # noqa: D107 - no super(): other paths
        if os.geteuid() != 0:
            raise ChrootMissing(f"PostgreSQL {major} runs in a chroot: the tests must run as root")
        self.major = major
        self.chroot = chroot_for(major)
        self.uid, self.gid = _chroot_ids(self.chroot)
        self.bindir = Path(f"/usr/lib/postgresql/{major}/bin")  # inside the chroot
        self.os_user = None  # the chroot's postgres (self.uid), not this machine's
        self.password = secrets.token_urlsafe(12)
        self.port = free_port()
        base = self.chroot / "var/tmp"
        self.root = Path(tempfile.mkdtemp(prefix="pgq-cluster-", dir=base))
        self.mounted = False
        if in_memory:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8g,mode=0700", "tmpfs", str(self.root)],
                                  capture_output=True, check=False)
            self.mounted = done.returncode == 0
        self.in_memory = self.mounted
        self.datadir = self.root / "data"
        self.sockdir = self.root / "sock"
        self.logfile = self.root / "server.log"

    def inner(self, path: Path) -> str:
        """A host-side path inside the chroot as the server sees it."""
        return "/" + str(Path(path).relative_to(self.chroot))

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        chroot = shutil.which("chroot") or "/usr/sbin/chroot"
        return subprocess.run(
            [chroot, f"--userspec={self.uid}:{self.gid}", str(self.chroot), str(self.bindir / args[0]), *args[1:]],
            check=check, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )

    def start(self) -> ChrootCluster:
        try:
            return self._start()
        except BaseException:
            self.stop()  # no tmpfs or folder left behind in the chroot
            raise

    def _start(self) -> ChrootCluster:
        self.sockdir.mkdir()
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        for path in (self.root, self.sockdir, pwfile):
            os.chown(path, self.uid, self.gid)
        # this machine's postgres (a PgBouncer in front) reaches the socket from outside
        self.root.chmod(0o711)
        self.sockdir.chmod(0o755)
        self._run(
            "initdb", "-D", self.inner(self.datadir), "-U", SUPERUSER, f"--pwfile={self.inner(pwfile)}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8",
        )
        pwfile.unlink()
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.inner(self.sockdir)}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 200\nshared_buffers = 256MB\n"
                "dynamic_shared_memory_type = mmap\n"  # no /dev/shm in the chroot
                f"max_wal_size = {'1GB' if self.in_memory else '4GB'}\n"
            )
        self.pg_ctl("start")
        return self

    def pg_ctl(self, action: str, mode: str = "fast") -> None:
        args = ["pg_ctl", "-D", self.inner(self.datadir), "-l", self.inner(self.logfile), "-w", "-t", "60"]
        if action in ("stop", "restart"):
            args += ["-m", mode]
        self._run(*args, action)

    def stop(self) -> None:
        if self.datadir.exists():
            self._run("pg_ctl", "-D", self.inner(self.datadir), "-m", "immediate", "-w", "stop", check=False)
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.root)], capture_output=True, check=False)
            self.mounted = False  # its files went with it
        shutil.rmtree(self.root, ignore_errors=True)


def local_major() -> int | None:
    """This machine's PostgreSQL major version (the one ThrowawayCluster runs), if any."""
    try:
        part = find_bindir().parts[-2]
    except RuntimeError:
        return None
    return int(part) if part.isdigit() else None


def make_cluster(major: int | None = None, in_memory: bool = False) -> ThrowawayCluster:
    """A started throwaway cluster of PostgreSQL `major`: this machine's own (None, or
    its version) as a ThrowawayCluster, any other in its chroot as a ChrootCluster."""
    if major is None or major == local_major():
        return ThrowawayCluster(in_memory=in_memory).start()
    return ChrootCluster(major, in_memory=in_memory).start()


def pg_version() -> int | None:
    """PGQ_TEST_PG: the PostgreSQL major version the tests' throwaway clusters run (17,
    18: in their Debian chroots); unset or empty: this machine's own."""
    value = os.environ.get("PGQ_TEST_PG", "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ChrootMissing(f"PGQ_TEST_PG={value!r}: a PostgreSQL major version, e.g. 17")
    if os.environ.get("PGQ_TEST_DSN"):
        raise ChrootMissing("PGQ_TEST_PG and PGQ_TEST_DSN exclude each other: the DSN's server has its own version")
    return int(value)


def new_cluster(in_memory: bool = True) -> ThrowawayCluster:
    """A started throwaway cluster of the tier's version (PGQ_TEST_PG)."""
    return make_cluster(pg_version(), in_memory=in_memory)
