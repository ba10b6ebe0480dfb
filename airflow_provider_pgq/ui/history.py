"""The last runs of each mover task: state and the move report its XCom holds."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace
from typing import Any

from sqlalchemy import and_, func, select, tuple_
from sqlalchemy.orm import Session


@dataclass(frozen=True)
class RunPoint:
    run_id: str
    run_after: str | None
    state: str | None
    events: int | None
    batches: int | None
    lag_seconds: float | None
    pending_events: int | None
    stop_reason: str | None
    #: The XCom covers the whole run across its tries (a report of this release); else
    #: it is missing (a killed try writes none) or one try's only, and the target's
    #: move journal gives the run's events and batches.
    whole_run: bool = False
    #: events and batches are the journal's (the XCom's were missing or partial)
    from_journal: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_journal(self, events: int, batches: int) -> RunPoint:
        """The run's totals as the journal has them, where the XCom had fewer or none."""
        if self.whole_run or (self.events is not None and self.events >= events
                              and self.batches is not None and self.batches >= batches):
            return self
        return replace(self, events=events, batches=batches, from_journal=True)


def recent_runs(session: Session, tasks: Iterable[tuple[str, str]], limit: int
                ) -> dict[tuple[str, str, int], list[RunPoint]]:
    """(dag_id, task_id, map_index) -> its last ``limit`` task instances, oldest first,
    in one query (a window over the task instances of the given tasks)."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance as TI
    from airflow.models.xcom import XComModel

    wanted = sorted(set(tasks))
    if not wanted:
        return {}
    rank = func.row_number().over(partition_by=(TI.dag_id, TI.task_id, TI.map_index),
                                  order_by=DagRun.run_after.desc()).label("rank")
    ranked = (
        select(TI.dag_id, TI.task_id, TI.map_index, TI.run_id, TI.state, DagRun.run_after,
               DagRun.id.label("dag_run_id"), rank)
        .join(DagRun, and_(DagRun.dag_id == TI.dag_id, DagRun.run_id == TI.run_id))
        .where(tuple_(TI.dag_id, TI.task_id).in_(wanted))
        .subquery()
    )
    # the reports of the last ``limit`` runs only: the XCom join comes after the cut
    query = (
        select(ranked, XComModel.value)
        .outerjoin(XComModel, and_(XComModel.dag_run_id == ranked.c.dag_run_id,
                                   XComModel.task_id == ranked.c.task_id, XComModel.map_index == ranked.c.map_index,
                                   XComModel.key == "return_value"))
        .where(ranked.c.rank <= limit)
        .order_by(ranked.c.run_after)
    )
    rows = session.execute(query).all()
    out: dict[tuple[str, str, int], list[RunPoint]] = {}
    for row in rows:
        report = XComModel.deserialize_value(SimpleNamespace(value=row.value)) if row.value is not None else None
        report = report if isinstance(report, dict) else {}
        out.setdefault((row.dag_id, row.task_id, row.map_index), []).append(RunPoint(
            run_id=row.run_id,
            run_after=row.run_after.isoformat() if row.run_after is not None else None,
            state=str(row.state.value if hasattr(row.state, "value") else row.state) if row.state else None,
            events=_number(report.get("events"), int),
            batches=_number(report.get("batches"), int),
            lag_seconds=_number(report.get("lag_seconds"), float),
            pending_events=_number(report.get("pending_events"), int),
            stop_reason=str(report["stop_reason"]) if report.get("stop_reason") is not None else None,
            whole_run=isinstance(report.get("attempts"), list),
        ))
    return out


def _number(value: Any, kind: type[Any]) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return kind(value)


def last_rendered(session: Session, tasks: Iterable[tuple[str, str]]
                  ) -> dict[tuple[str, str], tuple[str, dict[int, dict[str, Any]]]]:
    """(dag_id, task_id) -> (run id, {map_index: rendered template fields}) of the task's
    latest run that rendered them, in one query."""
    from airflow.models.dagrun import DagRun
    from airflow.models.renderedtifields import RenderedTaskInstanceFields as RTIF

    wanted = sorted(set(tasks))
    if not wanted:
        return {}
    rank = func.dense_rank().over(partition_by=(RTIF.dag_id, RTIF.task_id),
                                  order_by=(DagRun.run_after.desc(), DagRun.id.desc())).label("rank")
    ranked = (
        select(RTIF.dag_id, RTIF.task_id, RTIF.run_id, RTIF.map_index, RTIF.rendered_fields, rank)
        .join(DagRun, and_(DagRun.dag_id == RTIF.dag_id, DagRun.run_id == RTIF.run_id))
        .where(tuple_(RTIF.dag_id, RTIF.task_id).in_(wanted))
        .subquery()
    )
    out: dict[tuple[str, str], tuple[str, dict[int, dict[str, Any]]]] = {}
    for row in session.execute(select(ranked).where(ranked.c.rank == 1)).all():
        fields = row.rendered_fields if isinstance(row.rendered_fields, dict) else {}
        run_id, by_index = out.setdefault((row.dag_id, row.task_id), (row.run_id, {}))
        by_index[row.map_index] = fields
    return out
