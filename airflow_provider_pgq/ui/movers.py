"""The movers of a DAG, read from its serialized form (what the API server holds).

A task is a mover when its template fields include the mover's connection and queue
fields: a subclass defined in a DAG file (which the API server cannot import) is found
too. A mapped mover over a literal list (``expand_kwargs([...])``, or ``expand()`` of one
keyword) gives one mover per map index, in Airflow's order; any other mapping gives one
row that says so (``expand()`` of several lists numbers its indexes by the keyword order
of the DAG file, which the stored DAG does not keep).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

#: The template fields that make a task a mover (PgqQueueMoverOperator's own).
MOVER_FIELDS = frozenset(("source_conn_id", "target_conn_id", "source_queue", "target_queue"))
_SHOWN = ("source_conn_id", "target_conn_id", "source_queue", "target_queue", "consumer_name", "subconsumer")
_JINJA_MARKERS = ("{{", "{%", "{#")


class NotLiteral(ValueError):
    """A serialized value that only a run can resolve (an XComArg, a template object)."""


@dataclass(frozen=True)
class MoverSpec:
    dag_id: str
    task_id: str
    map_index: int
    source_conn_id: str
    target_conn_id: str
    source_queue: str
    target_queue: str
    consumer_name: str
    subconsumer: str
    #: Why the position cannot be read live (templated or run-time values), or None.
    problem: str | None = None
    #: The run whose rendered fields gave the values (templated or run-time ones), or None.
    rendered_from: str | None = None

    @property
    def key(self) -> str:
        """The row's anchor on the page: ``dag.task`` or ``dag.task[3]``."""
        suffix = f"[{self.map_index}]" if self.map_index >= 0 else ""
        return f"{self.dag_id}.{self.task_id}{suffix}"

    @property
    def live(self) -> bool:
        return self.problem is None


def _plain(value: Any) -> Any:
    """Airflow's serialized encoding of plain values, decoded; NotLiteral for anything else."""
    if isinstance(value, Mapping):
        if "__type" in value:
            if value["__type"] != "dict":
                raise NotLiteral(str(value["__type"]))
            return {k: _plain(v) for k, v in value["__var"].items()}
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _expansions(expand_input: Mapping[str, Any]) -> list[dict[str, Any]]:
    kind, value = expand_input.get("type"), _plain(expand_input.get("value"))
    if kind == "list-of-dicts" and isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return list(value)
    if kind == "dict-of-lists" and isinstance(value, dict) and len(value) == 1:
        ((key, values),) = value.items()
        if isinstance(values, list):
            return [{key: v} for v in values]
    # expand() over several lists: Airflow numbers the map indexes by the keyword order of
    # the DAG file, which the stored DAG does not keep (PostgreSQL's jsonb reorders keys)
    raise NotLiteral(str(kind))


def _spec(dag_id: str, task_id: str, map_index: int, fields: Mapping[str, Any], problem: str | None,
          rendered_from: str | None = None) -> MoverSpec:
    values = {name: fields.get(name) for name in _SHOWN}
    values["consumer_name"] = values["consumer_name"] or f"{dag_id}.{task_id}"
    values["subconsumer"] = values["subconsumer"] or ""
    if problem is None:
        templated = sorted(k for k, v in values.items()
                           if not isinstance(v, str) or any(m in v for m in _JINJA_MARKERS))
        if templated:
            problem = (f"{', '.join(templated)} templated or not a string: the position can only be read"
                       " for literal values (see each run's rendered fields)")
    shown = {k: v if isinstance(v, str) else repr(v) for k, v in values.items()}
    return MoverSpec(dag_id=dag_id, task_id=task_id, map_index=map_index, problem=problem,
                     rendered_from=rendered_from, **shown)


def movers_in_dag(dag_id: str, serialized: Mapping[str, Any]) -> Iterator[MoverSpec]:
    """Every mover of one serialized DAG (``SerializedDagModel.data``)."""
    for task in serialized.get("dag", {}).get("tasks", []):
        fields = task.get("__var", task)
        if not MOVER_FIELDS <= set(fields.get("template_fields", ())):
            continue
        task_id = str(fields.get("task_id"))
        if not fields.get("_is_mapped"):
            yield _spec(dag_id, task_id, -1, fields, None)
            continue
        partial = {k: v for k, v in fields.get("partial_kwargs", {}).items() if k in _SHOWN}
        try:
            expansions = _expansions(fields.get("expand_input", {}))
            partial = _plain(partial)
        except NotLiteral:
            yield _spec(dag_id, task_id, -1, partial,
                        "mapped over values known only at run time (or over several lists): one row"
                        " per map index needs expand_kwargs([...]) or expand() of one literal list")
            continue
        for index, expansion in enumerate(expansions):
            yield _spec(dag_id, task_id, index, {**partial, **expansion}, None)


def with_rendered_values(spec: MoverSpec, run_id: str, rendered: Mapping[int, Mapping[str, Any]]) -> list[MoverSpec]:
    """A mover the stored DAG cannot resolve (templated values, a mapping known at run time),
    as its last run rendered it: one mover per map index of that run."""
    return [_spec(spec.dag_id, spec.task_id, index, fields, None, run_id)
            for index, fields in sorted(rendered.items())]
