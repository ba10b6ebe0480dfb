"""PgqHook against real databases, with connections defined as Airflow defines them."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from airflow_provider_pgq import get_provider_info
from airflow_provider_pgq.core.errors import ConnectionFailed
from airflow_provider_pgq.hooks.pgq import PgqHook, UnsupportedConnection
from tests.core.test_poison_events import make_sql_ascii_db  # noqa: F401 - a fixture, for getfixturevalue
from tests.helpers import produce, require_password_checks, simple_events, tick


@pytest.fixture
def conn_env(monkeypatch):
    def define(conn_id: str, uri: str) -> None:
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", uri)

    return define


def test_hook_builds_psycopg2_connections_with_extras(source, conn_env):
    conn_env("pgq_src", source.uri() + "?sslmode=disable&connect_timeout=5")
    hook = PgqHook("pgq_src", application_name="hook-test")
    with hook.psycopg2_connection() as conn:
        assert conn.autocommit is False
        with conn.cursor() as cur:
            cur.execute("select current_database(), current_setting('application_name')")
            assert cur.fetchone() == (source.dbname, "hook-test")
        assert conn.get_dsn_parameters()["sslmode"] == "disable"


def test_hook_queue_operations(source, conn_env):
    conn_env("pgq_src", source.uri())
    hook = PgqHook("pgq_src")
    # PgQ's pending estimate is one low until a queue's first event was ticked
    produce(source, "src_q", simple_events(1, prefix="warmup"))
    tick(source, "src_q")
    assert hook.create_queue("other_q") is True
    assert hook.create_queue("other_q") is False
    assert hook.register_consumer("src_q", "c1") is True
    assert hook.register_consumer("src_q", "c1") is False
    produce(source, "src_q", simple_events(7))
    tick(source, "src_q")
    lag = hook.get_lag("src_q", "c1")
    assert lag.registered is True and lag.pending_events == 7 and (lag.lag_seconds or 0) >= 0
    assert lag.batch_available and lag.newest_tick == hook.get_queue_info("src_q").newest_tick
    nobody = hook.get_lag("src_q", "nobody")
    assert (nobody.registered, nobody.lag_seconds, nobody.pending_events) == (False, None, None)
    assert hook.count_events("src_q") == 8
    assert hook.get_queue_info("src_q").queue_name == "src_q"


def test_hook_installs_pgq_ext(make_db, conn_env):
    db = make_db(queue="q")
    conn_env("pgq_t", db.uri())
    PgqHook("pgq_t").install_pgq_ext()
    assert db.execute("select pgq_ext.version()")[0][0]


def test_wrong_password_never_shows_the_password(source, conn_env):
    require_password_checks(source.cluster)
    conn_env("pgq_bad", source.uri(user=source.cluster.superuser, password="Sw0rdfish-9931"))
    with pytest.raises(ConnectionFailed) as err:
        PgqHook("pgq_bad").get_conn()
    assert "Sw0rdfish-9931" not in str(err.value)
    assert "password authentication failed" in str(err.value)


def test_provider_info_is_found_through_the_entry_point():
    found = [ep for ep in entry_points(group="apache_airflow_provider") if ep.value.startswith("airflow_provider_pgq")]
    assert len(found) == 1
    info = found[0].load()()
    assert info == get_provider_info()
    assert info["package-name"] == "airflow-provider-pgq"
    assert info["connection-types"][0]["hook-class-name"] == "airflow_provider_pgq.hooks.pgq.PgqHook"
    # one version source: the installed distribution's and the one Airflow is told agree
    from importlib.metadata import version

    assert info["versions"] == [version("airflow-provider-pgq")]


def test_airflow_lists_the_provider_and_its_hook(airflow_home):
    env = {"AIRFLOW_HOME": str(airflow_home), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "airflow", "providers", "list", "-o", "json"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert any(p["package_name"] == "airflow-provider-pgq" for p in json.loads(out))
    hooks = subprocess.run([sys.executable, "-m", "airflow", "providers", "hooks", "-o", "json"],
                           env=env, capture_output=True, text=True, check=True).stdout
    assert any(h.get("connection_type") == "pgq" for h in json.loads(hooks))


# -- issue 14, point 1: connection errors name the Airflow connection and the right server --


def test_connection_error_names_the_connection_id_and_its_server(source, conn_env):
    require_password_checks(source.cluster)
    port = source.cluster.port
    conn_env("pgq_oltp", source.uri(user=source.cluster.superuser, password="Wr0ng-pass-4417"))
    with pytest.raises(ConnectionFailed) as err:
        PgqHook("pgq_oltp").get_conn()
    text = str(err.value)
    c = source.cluster
    assert text.startswith(f"Airflow connection 'pgq_oltp' ({c.host}:{port}/{source.dbname} as {c.superuser}): ")
    assert "password authentication failed" in text and "airflow connections get pgq_oltp" in text
    assert "local socket" not in text and "Wr0ng-pass-4417" not in text


def test_refused_connection_names_the_connection_id_and_port(conn_env):
    conn_env("pgq_down", "postgresql://mover:S3cret-9981@127.0.0.1:1/shop?connect_timeout=3")
    with pytest.raises(ConnectionFailed) as err:
        PgqHook("pgq_down").get_conn()
    text = str(err.value)
    assert text.startswith("Airflow connection 'pgq_down' (127.0.0.1:1/shop as mover): ")
    assert "\n" not in text and "S3cret-9981" not in text


# -- issue 13: a BaseHook of its own, not a PostgresHook whose inherited methods misbehave --


def test_hook_is_no_postgres_hook_and_reads_pgq_and_postgres_connections(source, conn_env):
    """Composition: nothing of PostgresHook's psycopg 3 surface is inherited; both the
    ``pgq`` and the ``postgres`` connection type work (the same fields, the same URI)."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook
    from airflow.sdk import BaseHook

    assert issubclass(PgqHook, BaseHook) and not issubclass(PgqHook, PostgresHook)
    assert not hasattr(PgqHook, "copy_expert") and not hasattr(PgqHook, "get_sqlalchemy_engine")
    conn_env("pgq_as_postgres", source.uri())  # postgresql://... -> conn_type postgres
    conn_env("pgq_as_pgq", "pgq://" + source.uri().split("://", 1)[1])
    for conn_id, conn_type in (("pgq_as_postgres", "postgres"), ("pgq_as_pgq", "pgq")):
        hook = PgqHook(conn_id)
        assert hook.connection.conn_type == conn_type
        with hook.psycopg2_connection() as conn, conn.cursor() as cur:
            cur.execute("select current_database()")
            assert cur.fetchone() == (source.dbname,)
        ok, message = hook.test_connection()
        assert ok and message.startswith("connected; pgq "), message


def test_hook_refuses_other_connection_types(conn_env):
    conn_env("pgq_mysql", "mysql://u:p@127.0.0.1:3306/db")
    with pytest.raises(UnsupportedConnection, match="'pgq_mysql' is of type 'mysql'.*'pgq' or 'postgres'"):
        PgqHook("pgq_mysql").get_conn()


@pytest.mark.parametrize("iam", ["true", "True", "1"])
def test_hook_refuses_iam_token_logins_instead_of_dropping_them(source, conn_env, iam):
    """PostgresHook turns ``iam`` into a token login; a psycopg2 hook that silently drops
    it would log in with no password. Refused, saying what to do."""
    conn_env("pgq_iam", source.uri() + f"?iam={iam}&aws_conn_id=aws_default&redshift=false")
    with pytest.raises(UnsupportedConnection, match="IAM / Entra ID token login.*remove the 'iam' extra"):
        PgqHook("pgq_iam").get_conn()
    ok, message = PgqHook("pgq_iam").test_connection()
    assert not ok and "IAM" in message


def test_hook_leaves_airflow_only_extras_out_of_libpq(source, conn_env):
    """iam=false, cursor, sqlalchemy_scheme... configure Airflow's SQL hooks: passed to
    libpq they would fail the login with 'invalid connection option'."""
    conn_env("pgq_extras", source.uri() + "?iam=false&cursor=dictcursor&sqlalchemy_scheme=postgresql"
             "&enable_log_db_messages=true&sslmode=disable")
    hook = PgqHook("pgq_extras")
    assert hook.connect_parameters()["sslmode"] == "disable"
    assert {"iam", "cursor", "sqlalchemy_scheme", "enable_log_db_messages"}.isdisjoint(hook.connect_parameters())
    with hook.psycopg2_connection() as conn:
        assert conn.get_dsn_parameters()["sslmode"] == "disable"



def test_hook_lists_and_replays_dead_letters(request, target, conn_env):
    """Issue 24: PgqHook on the target lists the dead letters as the source's bytes and
    replays them once, read as LATIN1."""
    from airflow_provider_pgq.core.mover import MoverOptions, QueueMover
    from tests.core.test_poison_events import POISON_DATA, POISON_EXTRA, produce_raw
    from tests.helpers import queue_events, register

    sa = request.getfixturevalue("make_sql_ascii_db")("src_q")
    register(sa, "src_q", "mover")
    ids = produce_raw(sa, "src_q", [POISON_DATA, POISON_EXTRA])
    tick(sa, "src_q")
    s, t = sa.connect(), target.connect()
    try:
        QueueMover(s, t, MoverOptions("src_q", "dst_q", "mover", invalid_events="dead_letter")).drain()
    finally:
        s.close()
        t.close()
    conn_env("pgq_dst", target.uri())
    hook = PgqHook("pgq_dst")
    letters = hook.list_dead_letters("mover")
    assert [(d.ev_id, d.ev_data, d.source_encoding) for d in letters] == [
        (ids[0], POISON_DATA[1], "SQL_ASCII"), (ids[1], POISON_EXTRA[1], "SQL_ASCII")]
    assert hook.replay_dead_letters("mover", dl_ids=[letters[0].dl_id], from_encoding="LATIN1") == 1
    assert hook.replay_dead_letters("mover", dl_ids=[letters[0].dl_id], from_encoding="LATIN1") == 0
    assert [d.ev_id for d in hook.list_dead_letters("mover")] == [ids[1]]
    assert [e[1] for e in queue_events(target, "dst_q")] == ["café au lait"]
