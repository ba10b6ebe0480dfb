"""No password, nor any piece of one, in an error, a log line, --status output or a repr.

Each case is one an attacker-tester reproduced against the substring redaction of
old: a connection string that does not parse (libpq quotes the piece it stumbled
on), a URI whose unescaped "@" puts the rest of the password in the host name, and
a short password whose blanking showed where it occurs in ordinary words. Every
password here is random letters in an alternating-case pattern that ordinary
messages never contain, so finding any 4-character piece of it is a leak.
"""

from __future__ import annotations

import os
import secrets
import signal
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from psycopg2 import sql

from airflow_provider_pgq.core.connect import connect, describe, redact
from airflow_provider_pgq.core.errors import ConnectionFailed
from tests.helpers import Server, mark_of, produce, register, require_password_checks, simple_events, tick
from tests.support.cluster import ThrowawayCluster, wait_until
from tests.test_cli import WAIT, base_keys, daemons, one_error_line, read_pid, run_cli, write_ini

__all__ = ["daemons"]  # the fixture, imported for the daemon test

LOWER = "bcdfghjkmnpqrstvwxz"
UPPER = LOWER.upper()


def random_word(pairs: int = 6) -> str:
    """'Zq' and alternating lower/upper consonants: no English or libpq word has that."""
    return "Zq" + "".join(secrets.choice(LOWER) + secrets.choice(UPPER) for _ in range(pairs))


def assert_no_piece(password: str, *texts: str, size: int = 4) -> None:
    """Neither the password nor any size-character piece of it occurs in the texts."""
    pieces = {password[i:i + size] for i in range(len(password) - size + 1)}
    for text in texts:
        for piece in pieces:
            assert piece not in text, f"{piece!r} of the password shown in: {text}"


def error_texts(exc: BaseException) -> list[str]:
    """Everything an error shows: str, repr, a printed traceback."""
    return [str(exc), repr(exc), "".join(traceback.format_exception(exc))]


def failure(dsn: str, **extra: str) -> ConnectionFailed:
    with pytest.raises(ConnectionFailed) as info:
        connect(dsn, **extra)
    exc = info.value
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)  # libpq's is not shown
    return exc


@pytest.fixture
def login(cluster: ThrowawayCluster) -> Iterator[Callable[..., tuple[str, str]]]:
    """login(password, superuser=False) -> (role, password): a real login role; dropped after."""
    made: list[str] = []

    def make(password: str, superuser: bool = False) -> tuple[str, str]:
        role = f"sec_{uuid.uuid4().hex[:10]}"
        cluster.execute("postgres", sql.SQL("create role {} login {} password %s").format(
            sql.Identifier(role), sql.SQL("superuser" if superuser else "")), (password,))
        made.append(role)
        return role, password

    yield make
    for role in made:
        cluster.execute("postgres", sql.SQL("drop role if exists {}").format(sql.Identifier(role)))


# -- connection strings that do not parse --------------------------------------------------


def test_bad_percent_escape_in_uri_password_is_not_echoed(source: Server) -> None:
    """libpq quotes the whole token with the bad %-escape: the whole password."""
    first, rest = random_word(), random_word()
    password = f"{first}%zz{rest}"
    exc = failure(f"postgresql://{source.cluster.superuser}:{password}@127.0.0.1:{source.cluster.port}/{source.dbname}")
    for word in (first, rest):
        assert_no_piece(word, *error_texts(exc))
    text = str(exc)
    assert text.startswith("bad connection string: invalid percent-encoded token")
    assert "percent-encode" in text and "%25" in text  # says what to fix


@pytest.mark.parametrize("separator", ["@", "/"])
def test_unescaped_at_or_slash_in_uri_password_is_refused_before_connecting(
    source: Server, separator: str
) -> None:
    """libpq ends the user info at the first "@" or "/": the rest of the password became
    the host (or port) and was named in "could not translate host name ..."."""
    head, tail = random_word(), random_word()
    dsn = f"postgresql://{source.cluster.superuser}:{head}{separator}{tail}@127.0.0.1:{source.cluster.port}/{source.dbname}"
    exc = failure(dsn)
    for word in (head, tail):
        assert_no_piece(word, *error_texts(exc), describe(dsn))
    text = str(exc)
    assert 'the URI has an "@" after its user name and password' in text and "%40" in text
    assert "translate" not in text and "port" not in text  # refused before libpq tried anything
    assert describe(dsn) == "<unparsable connection string>"


@pytest.mark.parametrize("after", ["", "=1"], ids=["missing-equals", "unknown-option"])
def test_unquoted_space_in_keyword_password_is_not_echoed(source: Server, after: str) -> None:
    """password=two words: libpq names "words" (missing "=" after it, or as an unknown
    option when "=" follows)."""
    head, tail = random_word(), random_word()
    c = source.cluster
    exc = failure(f"host=127.0.0.1 port={c.port} dbname={source.dbname} user={c.superuser}"
                  f" password={head} {tail}{after} connect_timeout=5")
    for word in (head, tail):
        assert_no_piece(word, *error_texts(exc))
    text = str(exc)
    assert text.startswith("bad connection string: ")
    assert "quote a value that holds spaces" in text  # says what to fix


def test_unparsable_string_without_a_password_still_names_the_typo() -> None:
    """Hiding is for strings that may hold a password; a plain typo stays readable."""
    exc = failure("host=127.0.0.1 dbname=x no_such_option=1")
    assert 'invalid connection option "no_such_option"' in str(exc)


# -- connect failures: the server named from the parsed fields, no blanking ------------------


@pytest.mark.parametrize("form", ["string", "keywords"])
def test_short_password_does_not_blank_words_of_the_message(source: Server, form: str) -> None:
    """password=auth (wrong): the substring redaction turned "authentication" into
    "***entication", showing where the password occurs."""
    c = source.cluster
    require_password_checks(c)
    fields = {"host": "127.0.0.1", "port": str(c.port), "dbname": source.dbname, "user": c.superuser}
    if form == "string":
        exc = failure(" ".join(f"{k}={v}" for k, v in fields.items()) + " password=auth")
    else:  # the hook's way: connect("", host=..., password=...)
        exc = failure("", **fields, password="auth")
    text = str(exc)
    assert f'password authentication failed for user "{c.superuser}"' in text
    assert "***" not in text
    assert f"cannot connect to 127.0.0.1:{c.port}/{source.dbname} as {c.superuser}:" in text


@pytest.mark.parametrize("form", ["string", "uri", "keywords"])
def test_password_equal_to_the_user_name_does_not_blank_the_user_name(
    source: Server, login: Callable[..., tuple[str, str]], form: str
) -> None:
    """A wrong password that equals the user name: the user name is not secret and stays."""
    require_password_checks(source.cluster)
    user, _ = login(random_word())
    c = source.cluster
    dsn = {
        "string": f"host=127.0.0.1 port={c.port} dbname={source.dbname} user={user} password={user}",
        "uri": f"postgresql://{user}:{user}@127.0.0.1:{c.port}/{source.dbname}",
        "keywords": "",
    }[form]
    extra = {"host": "127.0.0.1", "port": str(c.port), "dbname": source.dbname, "user": user,
             "password": user} if form == "keywords" else {}
    text = str(failure(dsn, **extra))
    assert f'password authentication failed for user "{user}"' in text
    assert f"/{source.dbname} as {user}:" in text
    assert "***" not in text


def test_good_connection_shows_no_password(source: Server, login: Callable[..., tuple[str, str]]) -> None:
    """A password with spaces, quotes, "@", "%" and "/", in every form connect() takes:
    repr, dsn, parameters and describe() of the open connection never show it.
    (psycopg2 shows password=xxx itself; this guards that nothing of ours undoes it.)"""
    head, middle, tail = random_word(), random_word(), random_word()
    user, password = login(f"{head} '@%/\\ {middle}\"{tail}")
    c = source.cluster
    quoted = password.replace("\\", "\\\\").replace("'", "\\'")
    keywords = {"host": "127.0.0.1", "port": str(c.port), "dbname": source.dbname, "user": user}
    forms: list[tuple[str, dict[str, str]]] = [
        (f"host=127.0.0.1 port={c.port} dbname={source.dbname} user={user} password='{quoted}'", {}),
        (f"postgresql://{user}:{quote(password, safe='')}@127.0.0.1:{c.port}/{source.dbname}", {}),
        ("", {**keywords, "password": password}),
    ]
    for dsn, extra in forms:
        conn = connect(dsn, **extra)
        try:
            with conn.cursor() as cur:
                cur.execute("select current_user")
                assert cur.fetchone() == (user,)
            shown = [repr(conn), conn.dsn, str(conn.get_dsn_parameters()), describe(dsn, **extra)]
        finally:
            conn.close()
        assert describe(dsn, **extra) == f"127.0.0.1:{c.port}/{source.dbname}"
        for word in (head, middle, tail):
            assert_no_piece(word, *shown)


def test_redact_hides_connection_string_passwords_only() -> None:
    """The log filter's last line of defence hides what follows password= and a URI's
    user info, never the same letters elsewhere in the line."""
    word = random_word()
    line = (f"auth {word}: password={word} host=h, postgresql://u:{word}@{word}@h/db,"
            " password authentication failed")
    out = redact(line)
    assert out == ("auth " + word + ": password=*** host=h, postgresql://u:***@h/db,"
                   " password authentication failed")


# -- the command line -----------------------------------------------------------------------


def ini(value: str) -> str:
    """value as written in an ini file, where % starts a reference."""
    return value.replace("%", "%%")


def broken_dsns(server: Server) -> dict[str, tuple[str, list[str]]]:
    """name -> (a connection string that does not work, the random words in its password)."""
    c = server.cluster
    a, b = random_word(), random_word()
    return {
        "uri-at": (f"postgresql://{c.superuser}:{a}@{b}@127.0.0.1:{c.port}/{server.dbname}", [a, b]),
        "uri-percent": (f"postgresql://{c.superuser}:{a}%zz{b}@127.0.0.1:{c.port}/{server.dbname}", [a, b]),
        "space": (f"host=127.0.0.1 port={c.port} dbname={server.dbname} user={c.superuser} password={a} {b}",
                  [a, b]),
    }


@pytest.mark.parametrize("case", ["uri-at", "uri-percent", "space"])
def test_status_with_a_broken_connection_string_shows_no_password(
    source: Server, target: Server, login: Callable[..., tuple[str, str]], tmp_path: Path, case: str
) -> None:
    """--status prints the servers from the parsed fields; with a broken dst_db it is one
    error line that names the key and the problem, and no piece of the password."""
    job = "status_mover"
    register(source, "src_q", job)
    head, tail = random_word(), random_word()
    user, password = login(f"{head} @% {tail}", superuser=True)
    good_dst = f"postgresql://{user}:{quote(password, safe='')}@127.0.0.1:{target.cluster.port}/{target.dbname}"
    good = run_cli("--status", write_ini(tmp_path / "good.ini", base_keys(source, target, job, dst_db=ini(good_dst))))
    assert good.returncode == 0, good.stderr
    assert f"127.0.0.1:{target.cluster.port}/{target.dbname} queue dst_q" in good.stdout
    for word in (head, tail):
        assert_no_piece(word, good.stdout, good.stderr)

    dsn, words = broken_dsns(target)[case]
    proc = run_cli("--status", write_ini(tmp_path / "bad.ini", base_keys(source, target, job, dst_db=ini(dsn))))
    for word in words:
        assert_no_piece(word, proc.stdout, proc.stderr)
    assert proc.returncode == 1 and proc.stdout == ""
    assert one_error_line(proc).startswith("pgq-queue-mover: error: dst_db: bad connection string: ")


def test_reload_onto_a_broken_connection_string_keeps_the_running_one(
    source: Server, target: Server, tmp_path: Path, daemons: list[Path]
) -> None:
    """-r onto an ini whose dst_db does not parse: one log line without the password, the
    old connection settings stay, and events keep moving (not an error every loop)."""
    job = "reload_secret_mover"
    register(source, "src_q", job)
    pidfile, logfile = tmp_path / "m.pid", tmp_path / "m.log"
    daemons.append(pidfile)
    keys = base_keys(source, target, job, pidfile=pidfile, logfile=logfile, loop_delay=0.1, exception_sleep=0.1)
    ini_path = write_ini(tmp_path / "m.ini", keys)
    assert run_cli("-d", ini_path).returncode == 0
    pid = read_pid(pidfile)
    produce(source, "src_q", simple_events(5))
    first = tick(source, "src_q")
    assert wait_until(lambda: mark_of(target, job) == first, WAIT)

    dsn, words = broken_dsns(target)["uri-percent"]
    write_ini(ini_path, {**keys, "dst_db": ini(dsn)})
    signalled = run_cli("-r", ini_path)
    assert signalled.returncode == 0, signalled.stderr
    assert wait_until(lambda: "reload failed" in logfile.read_text() or " ERROR " in logfile.read_text(), WAIT)
    for word in words:
        assert_no_piece(word, logfile.read_text(), signalled.stdout, signalled.stderr)

    # the daemon goes on with the running settings, through several loops
    produce(source, "src_q", simple_events(5, start=5))
    second = tick(source, "src_q")
    assert wait_until(lambda: mark_of(target, job) == second, WAIT)
    os.kill(pid, signal.SIGINT)
    assert wait_until(lambda: not pidfile.exists(), WAIT)

    text = logfile.read_text()
    failed = [line for line in text.splitlines() if "reload failed" in line]
    assert len(failed) == 1, text
    assert "keeping the running config: dst_db: bad connection string" in failed[0]
    assert " ERROR " not in text.replace(failed[0], "")  # no error per loop
    for word in words:
        assert_no_piece(word, text, signalled.stdout, signalled.stderr)
