"""Airflow fixtures: one migrated sqlite metadata database per test session, and a
function that runs a DAG through real Airflow (dag.test) in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "dags" / "examples"

DagRunner = Callable[..., dict[str, Any]]


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("airflow_home")
    env = _base_env(home, EXAMPLES)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                   capture_output=True, cwd=ROOT)
    return home


def _base_env(home: Path, dags: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW__"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "PYTHONPATH": str(ROOT),
    })
    return env


@pytest.fixture
def run_dag(airflow_home: Path, tmp_path: Path) -> DagRunner:
    """run_dag(dag_id, conns={conn_id: uri}, logical_date=..., env={}, dags_folder=None)."""

    def run(dag_id: str, conns: dict[str, str], logical_date: str = "2026-06-01T12:00:00+00:00",
            env: dict[str, str] | None = None, dags_folder: Path | None = None) -> dict[str, Any]:
        folder = dags_folder or EXAMPLES
        home = airflow_home
        if dags_folder is not None:
            # Its own metadata copy, so the DAG bundle of another folder never mixes in.
            home = tmp_path / "airflow_home"
            if not home.exists():
                shutil.copytree(airflow_home, home)
        full = _base_env(home, folder)
        full.update({f"AIRFLOW_CONN_{k.upper()}": v for k, v in conns.items()})
        full.update(env or {})
        proc = subprocess.run(
            [sys.executable, "-m", "tests.airflow.runner", dag_id, logical_date],
            env=full, capture_output=True, text=True, cwd=ROOT, timeout=600,
        )
        out = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if not out:
            raise AssertionError(f"DAG {dag_id} did not report (rc {proc.returncode}):\n"
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
        result: dict[str, Any] = json.loads(out[-1][len("RESULT "):])
        result["log"] = proc.stdout + proc.stderr
        return result

    return run
