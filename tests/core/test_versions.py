"""Mixed PostgreSQL versions: a source on one major version and a target on another
(both directions, both write paths, kept event ids), and a target upgraded in place
with pg_upgrade between two runs (15 -> 17).

Run by the version tiers of scripts/run-tests (PGQ_TEST_PG=17, PGQ_TEST_PG=18; marker
`versions`): the tier's version against this machine's PostgreSQL (15), and in the 18
tier also against 17. The other versions come from the Debian chroots scripts/setup-env
makes (tests/support/chroot.py); one that is missing fails the test, it is not skipped.
Without PGQ_TEST_PG (the plain run on this machine's version) there is nothing to pair:
one test says so with a skip.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg2 import sql

from airflow_provider_pgq.core import pgq_ext
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.mover import CHUNK_PATH, COPY_PATH, MoverOptions, QueueMover
from tests.helpers import (
    Login,
    Server,
    create_login,
    create_queue,
    mark_of,
    produce,
    queue_events,
    register,
    simple_events,
    tick,
)
from tests.support.chroot import ChrootCluster, local_major, pg_version
from tests.support.cluster import ThrowawayCluster, free_port

pytestmark = pytest.mark.versions

TIER = pg_version()
LOCAL = local_major() or 15


def tier_pairs(tier: int | None) -> list[tuple[int, int]]:
    """(source version, target version) pairs the tier runs."""
    if tier is None or tier == LOCAL:
        return []
    pairs = [(LOCAL, tier), (tier, LOCAL)]
    if tier == 18:
        pairs += [(17, 18), (18, 17)]
    return pairs


PAIRS = tier_pairs(TIER)


@pytest.fixture(scope="module")
def clusters(cluster: ThrowawayCluster) -> Iterator[Callable[[int], ThrowawayCluster]]:
    """clusters(major): a throwaway cluster of that version (the session's own for the
    tier's version), started on first use, stopped at the end of the module."""
    started: dict[int, ThrowawayCluster] = {}

    def get(major: int) -> ThrowawayCluster:
        if cluster.major == major:
            return cluster
        if major not in started:
            started[major] = (ThrowawayCluster(in_memory=True).start() if major == LOCAL
                              else ChrootCluster(major, in_memory=True).start())
        return started[major]

    yield get
    for c in started.values():
        c.stop()


def _database(c: ThrowawayCluster, queue: str, ext: bool) -> Server:
    name = f"v_{uuid.uuid4().hex[:12]}"
    c.create_database(name)
    c.execute(name, "create extension pgq")
    server = Server(c, name)
    create_queue(server, queue)
    if ext:
        conn = connect(server.dsn)
        try:
            pgq_ext.install(conn)
        finally:
            conn.close()
    return server


def _login(server: Server, role: str) -> Login:
    """A password login holding `role` (pgq_reader, pgq_mover) and nothing else."""
    return create_login(server.cluster, "vl", in_role=role)


def _move(source_dsn: str, target_dsn: str, **options: Any) -> Any:
    options.setdefault("source_queue", "src_q")
    options.setdefault("target_queue", "dst_q")
    opts = MoverOptions(consumer=options.pop("consumer", "mover"), **options)
    s, t = connect(source_dsn), connect(target_dsn)
    try:
        return QueueMover(s, t, opts).drain()
    finally:
        s.close()
        t.close()


def _version(server: Server) -> int:
    return int(server.execute("select current_setting('server_version_num')::int")[0][0]) // 10000


if not PAIRS:
    def test_cross_version_moves_run_in_the_version_tiers() -> None:
        pytest.skip("no second PostgreSQL version in this run: the version tiers (PGQ_TEST_PG=17, 18;"
                    " scripts/run-tests) pair this machine's PostgreSQL with 17 and 18")


if PAIRS:  # else the placeholder above
    @pytest.mark.parametrize("keep", [False, True], ids=["new-ids", "keep_event_id"])
    @pytest.mark.parametrize("path", [COPY_PATH, CHUNK_PATH])
    @pytest.mark.parametrize(("src_v", "dst_v"), PAIRS, ids=[f"{a}to{b}" for a, b in PAIRS])
    def test_a_move_between_versions_is_exact(
        clusters: Callable[[int], ThrowawayCluster], src_v: int, dst_v: int, path: str, keep: bool
    ) -> None:
        """Every event once, with its type, data, extras, time (and id, keep_event_id), the
        target's mark at the source's last tick; the least-privilege logins (pgq_reader,
        pgq_mover) take the chunk path, the superusers COPY."""
        source = _database(clusters(src_v), "src_q", ext=False)
        target = _database(clusters(dst_v), "dst_q", ext=True)
        assert (_version(source), _version(target)) == (src_v, dst_v)
        logins: list[tuple[Login, Server]] = []
        if path == CHUNK_PATH:
            reader, writer = _login(source, "pgq_reader"), _login(target, "pgq_mover")
            logins = [(reader, source), (writer, target)]
            src_dsn, dst_dsn = reader.dsn(source), writer.dsn(target)
        else:
            src_dsn, dst_dsn = source.dsn, target.dsn
        try:
            register(source, "src_q", "mover")
            events = simple_events(900)
            produce(source, "src_q", events[:300])
            tick(source, "src_q")
            produce(source, "src_q", events[300:700])
            first_last = tick(source, "src_q")
            first = _move(src_dsn, dst_dsn, keep_event_id=keep, chunk_size=128)
            assert first.write_path == path
            assert first.events == 700 and mark_of(target, "mover") == first_last
            produce(source, "src_q", events[700:])
            last = tick(source, "src_q")
            second = _move(src_dsn, dst_dsn, keep_event_id=keep, chunk_size=128)
            assert second.events == 200 and mark_of(target, "mover") == last
            assert _move(src_dsn, dst_dsn, keep_event_id=keep).events == 0
            assert queue_events(target, "dst_q", with_ids=keep) == queue_events(source, "src_q", with_ids=keep)
            assert sum(queue_events(target, "dst_q").values()) == 900
        finally:
            for server in (source, target):
                server.cluster.drop_database(server.dbname)
            for login, server in logins:
                server.cluster.execute("postgres", sql.SQL("drop role {}").format(sql.Identifier(login.name)))


# -- pg_upgrade of the target between two runs (15 -> 17) --------------------------------------


class _UpgradableTarget(ChrootCluster):
    """A PostgreSQL 15 cluster in the trixie chroot (bookworm's postgresql-15 next to
    trixie's 17 there, as pg_upgrade needs both in one system), upgraded in place to 17."""

    def __init__(self) -> None:
        super().__init__(17, in_memory=True)
        self.major = 15
        self.bindir = Path("/usr/lib/postgresql/15/bin")
        if not (self.chroot / "usr/lib/postgresql/15/bin/postgres").exists():
            self.stop()
            raise AssertionError(f"{self.chroot} has no postgresql-15 for pg_upgrade: run scripts/setup-env again"
                                 " (rm -rf the chroot first)")

    def upgrade(self) -> str:
        """Stops 15, pg_upgrade to a new 17 data folder (same superuser and password),
        starts 17 on the same port; returns pg_upgrade's output."""
        self.pg_ctl("stop")
        old, new = self.datadir, self.root / "data17"
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        os.chown(pwfile, self.uid, self.gid)
        self.bindir = Path("/usr/lib/postgresql/17/bin")
        self._run("initdb", "-D", self.inner(new), "-U", self.superuser, f"--pwfile={self.inner(pwfile)}",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8")
        pwfile.unlink()
        work = self.root / "upgrade"
        work.mkdir()
        os.chown(work, self.uid, self.gid)
        done = subprocess.run(
            ["/usr/sbin/chroot", f"--userspec={self.uid}:{self.gid}", str(self.chroot), "sh", "-c",
             'cd "$1" && shift && exec "$@"', "sh", self.inner(work),
             "/usr/lib/postgresql/17/bin/pg_upgrade", "-b", "/usr/lib/postgresql/15/bin",
             "-B", "/usr/lib/postgresql/17/bin", "-d", self.inner(old), "-D", self.inner(new),
             "-U", self.superuser, "-s", self.inner(work), "-p", str(free_port()), "-P", str(free_port())],
            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, check=False,
        )
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        conf = (old / "postgresql.conf").read_text()
        # the new cluster takes the old one's settings (port, socket, memory), then serves
        extra = conf[conf.index(f"\nport = {self.port}"):]
        with open(new / "postgresql.conf", "a") as f:
            f.write(extra)
        self.datadir = new
        self.major = 17
        self.pg_ctl("start")
        return done.stdout


@pytest.mark.skipif(TIER != 17, reason="the pg_upgrade test (15 -> 17) runs in the PostgreSQL 17 tier")
def test_a_target_upgraded_with_pg_upgrade_continues_exactly(clusters: Callable[[int], ThrowawayCluster]) -> None:
    """Two tracking keys on a 15 target (one with keep_event_id), a first run, pending
    events, pg_upgrade to 17, a second run: marks, bindings and kept-id state are as
    they were, and every event is in the target once (compared event by event)."""
    source = _database(clusters(LOCAL), "src_q", ext=False)
    create_queue(source, "src_k")
    target_cluster = _UpgradableTarget().start()
    try:
        target = _database(target_cluster, "dst_q", ext=True)
        create_queue(target, "dst_k")
        assert _version(target) == 15
        writer = _login(target, "pgq_mover")
        register(source, "src_q", "plain")
        register(source, "src_k", "kept")
        events = simple_events(1200)
        for queue in ("src_q", "src_k"):
            produce(source, queue, events[:500])
            tick(source, queue)

        def run() -> tuple[int, int]:
            a = _move(source.dsn, writer.dsn(target), consumer="plain")
            b = _move(source.dsn, target.dsn, consumer="kept", keep_event_id=True, source_queue="src_k",
                      target_queue="dst_k")
            assert (a.write_path, b.write_path) == (CHUNK_PATH, COPY_PATH)
            return a.events, b.events

        assert run() == (500, 500)
        for queue in ("src_q", "src_k"):
            produce(source, queue, events[500:900])
            tick(source, queue)  # pending at the upgrade
        state_query = (
            "select (select array_agg(row(c.*)::text order by c.consumer_id, c.subconsumer_id)"
            " from pgq_ext.completed_tick c),"
            " (select array_agg(row(s.*)::text order by 1) from pgq_ext.tracking_source s),"
            " (select array_agg(row(k.*)::text order by 1) from pgq_ext.kept_event_ids k),"
            " (select array_agg(row(k.*)::text order by 1) from pgq_ext.kept_ids_claims k),"
            " pgq_ext.mover_schema_version()"
        )
        before = target.execute(state_query)[0]
        marks = (mark_of(target, "plain"), mark_of(target, "kept"))
        assert None not in marks and before[1] is not None and before[2] is not None

        target_cluster.upgrade()

        assert _version(target) == 17
        assert target.execute(state_query)[0] == before
        assert (mark_of(target, "plain"), mark_of(target, "kept")) == marks
        for queue in ("src_q", "src_k"):
            produce(source, queue, events[900:])
            tick(source, queue)
        assert run() == (700, 700)
        assert run() == (0, 0)
        assert queue_events(target, "dst_q") == queue_events(source, "src_q")
        assert queue_events(target, "dst_k", with_ids=True) == queue_events(source, "src_k", with_ids=True)
        assert sum(queue_events(target, "dst_q").values()) == sum(queue_events(target, "dst_k").values()) == 1200
    finally:
        target_cluster.stop()
        source.cluster.drop_database(source.dbname)
