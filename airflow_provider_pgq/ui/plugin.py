"""Registers the PgQ page with Airflow (entry point ``airflow.plugins`` in pyproject.toml,
so installing the package is enough).

The app is mounted at /pgq of the API server; the "PgQ" entry of the UI's navigation
shows it in a frame, and each mover task instance links to its row (PgqMoverPageLink, declared by the operator).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airflow_provider_pgq.links.mover_page import PAGE_PREFIX
from airflow_provider_pgq.ui.app import create_app


class PgqUiPlugin(AirflowPlugin):
    name = "pgq"
    fastapi_apps = [{"app": create_app(), "url_prefix": PAGE_PREFIX, "name": "PgQ movers"}]
    external_views = [{
        "name": "PgQ",
        # relative: the UI resolves it against its own base URL (a deployment under a path prefix)
        "href": f"{PAGE_PREFIX.lstrip('/')}/",
        "url_route": "pgq",
        "destination": "nav",
        "nav_top_level": True,
    }]
