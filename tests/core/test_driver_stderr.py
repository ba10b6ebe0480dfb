"""The stderr filter around COPY (core/driver_stderr.py): psycopg2's printed double
fault goes into the message, everything else passes through in order."""

from __future__ import annotations

import io
import sys

import pytest

from airflow_provider_pgq.core.driver_stderr import DRIVER_STDERR

DOUBLE_FAULT = (
    "psycopg2.errors.ProtocolViolation: database removed\n",
    "\n",
    "The above exception was the direct cause of the following exception:\n",
    "\n",
    "SystemError: <function decode at 0x7f57da3adb20> returned a result with an exception set\n",
)


def test_the_driver_lines_are_kept_and_others_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    with DRIVER_STDERR:
        with DRIVER_STDERR:  # the source's and the target's COPY at once
            sys.stderr.write("a log line from ")
            sys.stderr.write("another thread\n")
            for piece in DOUBLE_FAULT:
                sys.stderr.write(piece)
        assert sys.stderr is DRIVER_STDERR  # still one COPY running
        sys.stderr.write("unfinished")
    assert sys.stderr is out
    assert out.getvalue() == "a log line from another thread\nunfinished"
    assert DRIVER_STDERR.take() == "database removed"
    assert DRIVER_STDERR.take() is None
