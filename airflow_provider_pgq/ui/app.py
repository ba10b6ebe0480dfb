"""The PgQ page's FastAPI app, mounted by the plugin under /pgq of the API server.

Every route needs a user authenticated by Airflow's auth manager (the UI's cookie or a
bearer token; 401 without); the movers endpoint shows only the DAGs the auth manager
lets the user read, run reports (XCom) only where it lets the user read task instances
and XComs, values a run rendered (run-time connection ids, queues) only where it lets
the user read task instances, and opens a connection (to read positions; of it only
host, port and database are shown) only when it lets the user read that connection,
as Airflow's own routes ask it (the DAG's and the connection's team included).
Read-only.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse

from airflow_provider_pgq.core.connect import SECRET_PARAMETERS
from airflow_provider_pgq.core.guard import Timeouts
from airflow_provider_pgq.core.positions import Positions
from airflow_provider_pgq.ui import live
from airflow_provider_pgq.ui.history import RunPoint, last_rendered, recent_runs
from airflow_provider_pgq.ui.movers import MoverSpec, movers_in_dag, with_rendered_values
from airflow_provider_pgq.ui.state import (
    DEFAULT_BEHIND_SECONDS,
    DEFAULT_STUCK_SECONDS,
    classify,
    marks_agree,
    rules,
)

STATIC = Path(__file__).parent / "static"
_ASSETS = {"pgq.js": "text/javascript", "pgq.css": "text/css"}

#: Bounds of the page's own sessions: a page never waits long on a database.
UI_TIMEOUTS = Timeouts(connect_timeout=5, network_timeout=10, statement_timeout=5, lock_timeout=2)


def _open(conn_id: str) -> Any:
    from airflow_provider_pgq.hooks.pgq import PgqHook

    conn = PgqHook(conn_id, application_name="airflow-pgq-ui", timeouts=UI_TIMEOUTS).get_conn()
    conn.set_session(readonly=True)  # the page never writes; the server holds it to that
    return conn


def _database(conn_id: str) -> live.Database:
    """Connections with the same parameters (the password aside) reach the same database."""
    from airflow_provider_pgq.hooks.pgq import PgqHook

    p = PgqHook(conn_id).connect_parameters()
    identity = tuple(sorted((k, v) for k, v in p.items() if k not in SECRET_PARAMETERS))
    shown = {"host": p.get("host") or p.get("hostaddr") or "(local socket)", "port": p.get("port") or "5432",
             "database": p.get("dbname") or "(the login's default)"}
    login = p.get("user") or os.environ.get("PGUSER") or getpass.getuser()
    return live.Database(identity, shown, login)


def _conf_float(key: str, default: float) -> float:
    from airflow.configuration import conf

    return conf.getfloat("pgq", key, fallback=default)


def _ui_prefix() -> str:
    from airflow.configuration import conf

    return urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


async def authenticated_user(request: Request) -> Any:
    """Airflow's own ``get_user`` (bearer token, else the UI's cookie; 401 without),
    imported on the first request: task processes load plugins too (for macros) and
    should not pay for the API server's modules."""
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user

    return await get_user(request=request, _oauth_token=None, bearer_credentials=await bearer_scheme(request))


GetUserDep = Annotated[Any, Depends(authenticated_user)]


def create_app(reader: live.LiveReader | None = None) -> FastAPI:
    app = FastAPI(title="PgQ movers", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.reader = reader or live.LiveReader(_open, ttl=_conf_float("ui_cache_seconds", 5.0),
                                                 bound=_conf_float("ui_read_seconds", 8.0))

    @app.get("/", response_class=HTMLResponse)
    def index(user: GetUserDep) -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    def asset(name: str, user: GetUserDep) -> FileResponse:
        if name not in _ASSETS:
            raise HTTPException(404, "no such file")
        return FileResponse(STATIC / name, media_type=_ASSETS[name])

    @app.get("/api/movers")
    def movers(user: GetUserDep, runs: int = Query(20, ge=1, le=200)) -> dict[str, Any]:
        return _movers(app.state.reader, user, runs)

    return app


def _movers(reader: live.LiveReader, user: Any, runs: int) -> dict[str, Any]:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import (
        ConnectionDetails,
        DagAccessEntity,
        DagDetails,
    )
    from airflow.models.connection import Connection
    from airflow.models.dag import DagModel
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    auth = get_auth_manager()
    readable = auth.get_authorized_dag_ids(user=user, method="GET")
    with create_session() as session:
        active = list(session.scalars(select(DagModel.dag_id).where(DagModel.dag_id.in_(readable),
                                                                    DagModel.is_stale.is_(False))))
        found = [spec for sd in SerializedDagModel.get_latest_serialized_dags(dag_ids=active, session=session)
                 for spec in movers_in_dag(sd.dag_id, sd.data or {})]
        dags = sorted({s.dag_id for s in found})
        teams = DagModel.get_dag_id_to_team_name_mapping(dags, session=session) if dags else {}

        def may_read(dag_id: str, *entities: Any) -> bool:
            return all(auth.is_authorized_dag(method="GET", access_entity=entity,
                                              details=DagDetails(id=dag_id, team_name=teams.get(dag_id)), user=user)
                       for entity in entities)

        # what a run rendered is task-instance data; a run's state and report are task
        # instances and XComs of the DAG (of its team, if any)
        instances = {d for d in dags if may_read(d, DagAccessEntity.TASK_INSTANCE)}
        reports = {d for d in instances if may_read(d, DagAccessEntity.XCOM)}
        rendered = last_rendered(session, {(s.dag_id, s.task_id) for s in found
                                           if not s.live and s.dag_id in instances})
        specs = [r for s in found for r in _resolved(s, rendered)]
        history = recent_runs(session, {(s.dag_id, s.task_id) for s in specs if s.dag_id in reports}, runs)
        conn_ids = sorted({c for s in specs if s.live for c in (s.source_conn_id, s.target_conn_id)})
        conn_teams = Connection.get_conn_id_to_team_name_mapping(conn_ids, session=session) if conn_ids else {}
        connections = {c for c in conn_ids
                       if auth.is_authorized_connection(
                           method="GET", details=ConnectionDetails(conn_id=c, team_name=conn_teams.get(c)),
                           user=user)}
    behind = _conf_float("ui_behind_seconds", DEFAULT_BEHIND_SECONDS)
    stuck = _conf_float("ui_stuck_seconds", DEFAULT_STUCK_SECONDS)
    rows = build_rows(reader, sorted(specs, key=lambda s: (s.dag_id, s.task_id, s.map_index)), history,
                      behind, _ui_prefix(), reports, connections=connections, stuck=stuck)
    return {"generated_at": dt.datetime.now(dt.timezone.utc).isoformat(), "behind_seconds": behind,
            "stuck_seconds": stuck, "rules": rules(behind, stuck), "movers": rows}


def _resolved(spec: MoverSpec, rendered: dict[tuple[str, str], tuple[str, dict[int, dict[str, Any]]]]
              ) -> list[MoverSpec]:
    """A mover the stored DAG cannot resolve, as its last run rendered it (if it ran)."""
    if spec.live or (spec.dag_id, spec.task_id) not in rendered:
        return [spec]
    run_id, by_index = rendered[(spec.dag_id, spec.task_id)]
    return with_rendered_values(spec, run_id, by_index) or [spec]


def build_rows(reader: live.LiveReader, specs: Sequence[MoverSpec],
               history: dict[tuple[str, str, int], list[RunPoint]], behind: float, ui_prefix: str,
               reports: set[str], *, connections: Collection[str],
               stuck: float = DEFAULT_STUCK_SECONDS) -> list[dict[str, Any]]:
    """One row per mover: live position (one read per database), last runs, state.
    connections: the connection ids the user may read; no other is opened or shown."""
    databases: dict[str, live.Database | str] = {}
    for conn_id in {c for s in specs if s.live for c in (s.source_conn_id, s.target_conn_id)}:
        if conn_id not in connections:
            databases[conn_id] = ("you may not read this connection, so the page neither opens nor shows it"
                                  " (ask for read access to it)")
            continue
        try:
            databases[conn_id] = _database(conn_id)
        except Exception as exc:  # noqa: BLE001 - an unknown connection is a row error
            databases[conn_id] = live.describe(exc)
    readable = [s for s in specs if s.live and all(isinstance(databases[c], live.Database)
                                                   for c in (s.source_conn_id, s.target_conn_id))]
    # runs without a whole-run report (a killed try wrote no XCom): the target's journal tells
    partial = {k: [p.run_id for p in points if not p.whole_run] for k, points in history.items()}
    answers = reader.read(live.plan(readable, {c: d for c, d in databases.items() if isinstance(d, live.Database)},
                                    {k: v for k, v in partial.items() if v}))
    return [_row(s, databases, answers, history, behind, ui_prefix, s.dag_id in reports, stuck) for s in specs]


def _side(conn_id: str, queue: str, database: live.Database | str | None) -> dict[str, Any]:
    shown = database.shown if isinstance(database, live.Database) else {}
    return {"conn_id": conn_id, "queue": queue, **shown}


def _answer(side: str, conn_id: str, db: live.Database | str | None,
            answers: dict[live.Database, live.Answer], errors: list[str]) -> Positions | None:
    """The read of one side's database, or None with the reason added to ``errors``."""
    if isinstance(db, str):
        errors.append(f"{side} connection {conn_id!r}: {db}")
        return None
    answer = answers.get(db) if db is not None else None
    if isinstance(answer, str):
        errors.append(f"{side} database: {answer}")
        return None
    return answer


def _journaled(spec: MoverSpec, point: RunPoint, target: Positions) -> RunPoint:
    totals = target.runs.get((spec.consumer_name, spec.subconsumer, spec.dag_id, spec.task_id, spec.map_index,
                              point.run_id))
    return point if totals is None else point.with_journal(totals.events, totals.batches)


def _row(spec: MoverSpec, databases: dict[str, live.Database | str], answers: dict[live.Database, live.Answer],
         history: dict[tuple[str, str, int], list[RunPoint]], behind: float, ui_prefix: str,
         reports: bool, stuck: float) -> dict[str, Any]:
    errors = [spec.problem] if spec.problem else []
    src_db, dst_db = databases.get(spec.source_conn_id), databases.get(spec.target_conn_id)
    src_answer = _answer("source", spec.source_conn_id, src_db, answers, errors)
    dst_answer = _answer("target", spec.target_conn_id, dst_db, answers, errors)
    source = src_answer.sources.get((spec.source_queue, spec.consumer_name)) if src_answer else None
    target = dst_answer.targets.get((spec.target_queue, spec.consumer_name, spec.subconsumer)) if dst_answer else None
    if src_answer and spec.source_queue in src_answer.missing_queues:
        errors.append(f"source queue {spec.source_queue!r} does not exist")
    if dst_answer and dst_answer.target_problem:
        errors.append(f"target database: {dst_answer.target_problem}")
    unknown = bool(spec.problem) or any(isinstance(answers.get(db), live.NoAnswer)
                                        for db in (src_db, dst_db) if isinstance(db, live.Database))
    if source is not None and not source.registered:
        errors.append(f"consumer {spec.consumer_name!r} is not registered on {spec.source_queue!r}")
    if target is not None and not target.queue_exists:
        errors.append(f"target queue {spec.target_queue!r} does not exist")
    points = history.get((spec.dag_id, spec.task_id, spec.map_index), []) if reports else []
    if dst_answer is not None and dst_answer.runs:
        points = [_journaled(spec, p, dst_answer) for p in points]
    # the latest task instance's state, where the user may read it (as the run history)
    task_state = points[-1].state if points else None
    state = classify(source, target, "; ".join(errors) or None, behind, unknown, stuck, task_state)
    return {
        "key": spec.key, "dag_id": spec.dag_id, "task_id": spec.task_id, "map_index": spec.map_index,
        "grid_url": f"{ui_prefix}/dags/{quote(spec.dag_id, safe='')}",
        "source": _side(spec.source_conn_id, spec.source_queue, src_db),
        "target": _side(spec.target_conn_id, spec.target_queue, dst_db),
        "consumer_name": spec.consumer_name, "subconsumer": spec.subconsumer,
        "rendered_from": spec.rendered_from,
        "registered": source.registered if source else None,
        "last_tick": source.last_tick if source else None,
        "current_batch": source.current_batch if source else None,
        "newest_tick": source.newest_tick if source else None,
        "target_mark": target.mark if target else None,
        "marks_agree": marks_agree(source, target) if source and target else None,
        "lag_seconds": source.lag_seconds if source else None,
        "last_seen_seconds": source.last_seen_seconds if source else None,
        "pending_events": source.pending_events if source else None,
        "state": state.value, "errors": errors,
        "runs": [p.to_dict() for p in points] if reports else None,
    }
