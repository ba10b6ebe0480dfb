"""The harness against a server a user names (PGQ_TEST_DSN): another superuser name
and no password (a server that trusts the tests' address). A sample of the suite runs
in a pytest of its own against such a cluster: the tests that named the superuser,
compared the password with the output and put a PgBouncer in front (issue 22: 62 of
the fast tier failed so; tests/support/cluster.py's trust cluster stands in for it)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.helpers import ROOT
from tests.support.chroot import pg_version
from tests.support.cluster import ThrowawayCluster

SAMPLE = [
    "tests/hooks/test_pgq_hook.py",
    "tests/test_cli.py::test_bad_config_is_one_line_with_the_right_exit_code",
    "tests/core/test_bad_input.py::test_wrong_password_is_named_without_showing_it",
    "tests/security/test_secrets.py::test_short_password_does_not_blank_words_of_the_message",
    "tests/core/test_pooled_sessions.py::test_every_pooled_transaction_runs_pinned_and_bounded",
    "tests/faults/test_quiet_faults.py::test_target_postmaster_kill9_and_crash_recovery",
]


@pytest.fixture(scope="module")
def trusting_server() -> Iterator[ThrowawayCluster]:
    if os.environ.get("PGQ_TEST_DSN") or pg_version() is not None:
        pytest.skip("runs on this machine's PostgreSQL without PGQ_TEST_DSN: it starts the server it names")
    c = ThrowawayCluster(in_memory=True, superuser="someone_else", trust=True).start()
    try:
        yield c
    finally:
        c.stop()


def test_the_suite_runs_against_a_named_server_with_another_superuser_and_no_password(
    trusting_server: ThrowawayCluster,
) -> None:
    dsn = f"postgresql://someone_else@127.0.0.1:{trusting_server.port}/postgres"
    env = {**os.environ, "PGQ_TEST_DSN": dsn, "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-rs", *SAMPLE],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out[-6000:] + done.stderr[-2000:]
    summary = out.strip().splitlines()[-1]
    assert " failed" not in summary and " error" not in summary and " passed" in summary, summary
    # what such a server cannot do is skipped, saying why
    assert "does not check passwords for the tests' address (trust)" in out, out[-3000:]
    assert "the storm tier needs clusters of its own" in out, out[-3000:]
