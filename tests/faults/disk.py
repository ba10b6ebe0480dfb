"""A small disk for the target's event tables: a tablespace on a tmpfs of its own.

``SmallDisk.start()`` mounts a tmpfs (owned by the cluster's OS user) and returns
False when this machine does not allow it (not root, no CAP_SYS_ADMIN): the full-disk
fault is then not drawn. ``fill(headroom)`` shrinks the tmpfs to what it holds plus
``headroom`` bytes (a remount, so no filler file takes memory), so the next writes
that extend a table on it fail with "No space left on device"; ``free()`` grows it
back. Only the tablespace's files live there: WAL, the catalog and temporary files
stay on the cluster's own disk, as with a tablespace on a volume of its own.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from psycopg2 import sql

from tests.support.cluster import ThrowawayCluster

#: The tmpfs's size while there is room: far more than a soak writes (tmpfs takes
#: memory only for what it holds).
ROOMY = 4 << 30


class SmallDisk:
    def __init__(self, cluster: ThrowawayCluster, tablespace: str) -> None:
        self.cluster = cluster
        self.tablespace = tablespace
        self.mountpoint: Path | None = None

    def start(self) -> bool:
        """Mounts the tmpfs and creates the tablespace on it; False if mounting is not allowed."""
        if os.geteuid() != 0 or self.cluster.os_user is None:
            return False
        entry = pwd.getpwnam(self.cluster.os_user)
        mountpoint = Path(tempfile.mkdtemp(prefix="pgq-storm-disk-"))
        options = f"size={ROOMY},uid={entry.pw_uid},gid={entry.pw_gid},mode=0700"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            mountpoint.rmdir()
            return False
        self.mountpoint = mountpoint
        self.cluster.execute("postgres", sql.SQL("create tablespace {} location {}").format(
            sql.Identifier(self.tablespace), sql.Literal(str(mountpoint))))
        return True

    def used(self) -> int:
        assert self.mountpoint is not None
        st = os.statvfs(self.mountpoint)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def _resize(self, size: int) -> None:
        assert self.mountpoint is not None
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.mountpoint)],
                       capture_output=True, text=True, check=True)

    def fill(self, headroom: int) -> None:
        """Leaves only about `headroom` bytes free."""
        self._resize(self.used() + headroom)

    def free(self) -> None:
        self._resize(ROOMY)

    def stop(self) -> None:
        """Drops the tablespace (it must be empty by now) and unmounts."""
        if self.mountpoint is None:
            return
        try:
            self.cluster.execute("postgres", sql.SQL("drop tablespace if exists {}").format(
                sql.Identifier(self.tablespace)))
        finally:
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True, check=False)
            self.mountpoint.rmdir()
            self.mountpoint = None


def move_event_tables(execute: Callable[..., list[tuple[Any, ...]]], queue: str, tablespace: str) -> int:
    """Moves a queue's event tables (the parent and its children) and their indexes
    into the tablespace; `execute(query, params)` runs in the queue's database.
    Returns how many relations moved."""
    parent = str(execute("select queue_data_pfx from pgq.queue where queue_name = %s", (queue,))[0][0])
    rels = execute(
        "with t as (select inhrelid as oid from pg_catalog.pg_inherits where inhparent = %s::regclass"
        "           union all select %s::regclass::oid)"
        " select n.nspname, c.relname, c.relkind = 'i' from pg_catalog.pg_class c"
        " join pg_catalog.pg_namespace n on n.oid = c.relnamespace"
        " where c.oid in (select oid from t)"
        "    or c.oid in (select indexrelid from pg_catalog.pg_index where indrelid in (select oid from t))",
        (parent, parent),
    )
    for schema, name, is_index in rels:
        execute(sql.SQL("alter {} {} set tablespace {}").format(
            sql.SQL("index" if is_index else "table"), sql.Identifier(schema, name), sql.Identifier(tablespace)))
    return len(rels)
