"""Apache Airflow provider for moving PgQ events between PostgreSQL databases."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def get_provider_info() -> dict[str, Any]:
    return {"package-name": "airflow-provider-pgq", "name": "PgQ", "description": "PgQ queue mover", "versions": [__version__]}
