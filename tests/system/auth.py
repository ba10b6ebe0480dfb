"""The deployment's auth manager: Airflow's SimpleAuthManager plus per-DAG refusals.

SimpleAuthManager grants by role only (a viewer reads every DAG); a real deployment's
auth manager (FAB, Keycloak) can refuse single DAGs. This subclass refuses the DAGs
named in ``PGQ_TEST_HIDDEN_DAGS`` (``user:dag1|dag2,user2:dag3``) to those users, so
the tests can show that the PgQ page asks the auth manager and shows what it allows.
"""

from __future__ import annotations

import os
from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager


def hidden_dags(variable: str = "PGQ_TEST_HIDDEN_DAGS") -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for item in filter(None, os.environ.get(variable, "").split(",")):
        user, _, dags = item.partition(":")
        out[user] = set(dags.split("|"))
    return out


class DagRestrictedAuthManager(SimpleAuthManager):
    """Also refuses the task instances (only) of the DAGs in ``PGQ_TEST_NO_TASK_INSTANCES``
    (same format) to those users: they may read the DAG, not what its runs rendered."""

    def is_authorized_dag(self, *, method: Any, user: Any, access_entity: Any = None, details: Any = None) -> bool:
        from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity

        dag_id = getattr(details, "id", None)
        if dag_id is not None and dag_id in hidden_dags().get(user.username, set()):
            return False
        if (dag_id is not None and access_entity == DagAccessEntity.TASK_INSTANCE
                and dag_id in hidden_dags("PGQ_TEST_NO_TASK_INSTANCES").get(user.username, set())):
            return False
        return bool(super().is_authorized_dag(method=method, user=user, access_entity=access_entity,
                                              details=details))
