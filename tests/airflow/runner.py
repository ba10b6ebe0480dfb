"""Runs one DAG with dag.test() in this process and prints its outcome as JSON.

Started as a subprocess by the tests, with AIRFLOW_HOME, the DAGs folder and the
AIRFLOW_CONN_* connections in its environment: Airflow reads its configuration
once per process, so each DAG run gets a clean one.
usage: python -m tests.airflow.runner DAG_ID LOGICAL_DATE_ISO
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys


def main() -> int:
    dag_id, logical = sys.argv[1], sys.argv[2]
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    if bag.import_errors:
        print(json.dumps({"import_errors": {k: str(v) for k, v in bag.import_errors.items()}}))
        return 3
    dag = bag.get_dag(dag_id)
    assert dag is not None, f"{dag_id} not found"
    conf = json.loads(os.environ.get("PGQ_TEST_RUN_CONF", "{}"))
    run = dag.test(logical_date=dt.datetime.fromisoformat(logical), run_conf=conf or None)
    with create_session() as session:
        tis = run.get_task_instances(session=session)
        states = {f"{ti.task_id}[{ti.map_index}]": str(ti.state) for ti in tis}
        xcoms = {}
        for row in session.query(XComModel).filter(
            XComModel.dag_run_id == run.id, XComModel.key == "return_value"
        ):
            xcoms[f"{row.task_id}[{row.map_index}]"] = row.value
        from airflow.models.asset import AssetEvent, AssetModel

        assets = [
            {"uri": uri, "extra": extra, "task_id": task_id}
            for uri, extra, task_id in session.query(AssetModel.uri, AssetEvent.extra, AssetEvent.source_task_id)
            .join(AssetEvent, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetEvent.source_dag_id == dag_id, AssetEvent.source_run_id == run.run_id)
        ]
    print("RESULT " + json.dumps({"state": str(run.state), "tasks": states, "xcom": xcoms,
                                  "asset_events": assets}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
