"""Runs DAGs with dag.test() and prints each outcome as JSON ("RESULT {...}").

Started by the tests (tests/conftest.py, run_dag) as one long-lived worker per DAGs
folder, with AIRFLOW_HOME and the DAGs folder in its environment:

    python -m tests.airflow.runner --serve

imports Airflow and parses the whole folder once (any import error there fails every
run, as a fresh `airflow dags test` would), says READY on stdout, then reads one JSON
request a line on stdin: {"dag_id", "logical_date", "env", "log"}. For each it sets
the request's environment (its AIRFLOW_CONN_* connections and other variables; those
of the request before are removed), sends fds 1 and 2 to the "log" file, parses only
the file(s) naming that DAG, runs it and answers {"rc": N} on its own stdout.

One run by hand: python -m tests.airflow.runner DAG_ID LOGICAL_DATE_ISO
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any


def read_result(output: str) -> dict[str, Any] | None:
    """The last "RESULT {...}" line of a run's output, as a dict (None: no such line). A
    log line another thread (the openlineage client's) writes at the same moment may end
    up after the JSON on the same line: only the JSON object is read."""
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return None
    result, _ = json.JSONDecoder().raw_decode(lines[-1][len("RESULT "):])
    return dict(result)


def dag_files(folder: str, dag_id: str) -> list[str]:
    """The .py files of the folder that name dag_id as a string literal; the whole
    folder when none does (a DAG id built at parse time)."""
    root = Path(folder)
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
    quoted = (f'"{dag_id}"', f"'{dag_id}'")
    named = [str(f) for f in files if any(q in f.read_text(errors="replace") for q in quoted)]
    return named or [folder]


def import_errors(folder: str) -> dict[str, str]:
    from airflow.dag_processing.dagbag import DagBag

    return {k: str(v) for k, v in DagBag(dag_folder=folder).import_errors.items()}


def run(dag_id: str, logical: str, folder: str) -> int:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    dag = None
    for path in dag_files(folder, dag_id):
        bag = DagBag(dag_folder=path)
        if bag.import_errors:
            print(json.dumps({"import_errors": {k: str(v) for k, v in bag.import_errors.items()}}))
            return 3
        dag = bag.get_dag(dag_id) or dag
    assert dag is not None, f"{dag_id} not found"
    conf = json.loads(os.environ.get("PGQ_TEST_RUN_CONF", "{}"))
    from airflow.models.asset import AssetEvent, AssetModel

    with create_session() as session:
        # asset events of this run only, also when an earlier run had the same run_id
        before = session.query(AssetEvent.id).order_by(AssetEvent.id.desc()).limit(1).scalar() or 0
    run = dag.test(logical_date=dt.datetime.fromisoformat(logical), run_conf=conf or None)
    with create_session() as session:
        tis = run.get_task_instances(session=session)
        states = {f"{ti.task_id}[{ti.map_index}]": str(ti.state) for ti in tis}
        xcoms = {}
        for row in session.query(XComModel).filter(
            XComModel.dag_run_id == run.id, XComModel.key == "return_value"
        ):
            xcoms[f"{row.task_id}[{row.map_index}]"] = row.value
        assets = [
            {"uri": uri, "extra": extra, "task_id": task_id}
            for uri, extra, task_id in session.query(AssetModel.uri, AssetEvent.extra, AssetEvent.source_task_id)
            .join(AssetEvent, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetEvent.source_dag_id == dag_id, AssetEvent.source_run_id == run.run_id,
                    AssetEvent.id > before)
        ]
    print("RESULT " + json.dumps({"state": str(run.state), "tasks": states, "xcom": xcoms,
                                  "asset_events": assets}, default=str))
    return 0


def _one(request: dict[str, Any], folder: str, errors: dict[str, str]) -> int:
    if errors:
        print(json.dumps({"import_errors": errors}))
        return 3
    return run(request["dag_id"], request["logical_date"], folder)


def serve() -> int:
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # between runs, whatever is printed goes to stderr, not into the replies
    base_env = dict(os.environ)
    folder = os.environ["AIRFLOW__CORE__DAGS_FOLDER"]
    errors = import_errors(folder)
    reply.write("READY\n")
    for line in sys.stdin:
        request = json.loads(line)
        os.environ.clear()
        os.environ.update(base_env)
        os.environ.update(request["env"])
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(request["log"], "w") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                rc = _one(request, folder, errors)
            except Exception:
                traceback.print_exc()
                rc = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
        reply.write(json.dumps({"rc": rc}) + "\n")
    return 0


def main() -> int:
    if sys.argv[1:] == ["--serve"]:
        return serve()
    dag_id, logical = sys.argv[1], sys.argv[2]
    folder = os.environ["AIRFLOW__CORE__DAGS_FOLDER"]
    return _one({"dag_id": dag_id, "logical_date": logical}, folder, import_errors(folder))


if __name__ == "__main__":
    sys.exit(main())
