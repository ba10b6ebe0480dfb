"""The real pgqd ticker daemon, run for a throwaway cluster's chosen databases."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support.cluster import ThrowawayCluster


class Pgqd:
    """Ticks just the databases it is told to watch (never those a test ticks by hand)."""

    def __init__(self, cluster: ThrowawayCluster, workdir: Path) -> None:
        if shutil.which("pgqd") is None:
            raise RuntimeError("pgqd not found: install the Debian package pgqd")
        self.cluster = cluster
        self.workdir = Path(workdir)
        self.databases: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def watch(self, *dbnames: str) -> None:
        self.databases += list(dbnames)
        self.stop()
        ini = self.workdir / "pgqd.ini"
        base = self.cluster.dsn("postgres").replace(" dbname=postgres", "")
        ini.write_text(
            "[pgqd]\n"
            f"logfile = {self.workdir / 'pgqd.log'}\n"
            f"pidfile = {self.workdir / 'pgqd.pid'}\n"
            f"base_connstr = {base}\n"
            "initial_database = postgres\n"
            f"database_list = {','.join(self.databases)}\n"
            "check_period = 1\nticker_period = 0.2\nretry_period = 1\nmaint_period = 60\n"
        )
        ini.chmod(0o600)  # it holds the cluster's password
        self.proc = subprocess.Popen(["pgqd", str(ini)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None
