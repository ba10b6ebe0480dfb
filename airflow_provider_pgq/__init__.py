"""Apache Airflow provider for moving PgQ events between PostgreSQL databases."""

from __future__ import annotations

from typing import Any

#: The one version source: pyproject.toml reads it (dynamic version), and so does Airflow.
__version__ = "0.2.0"


def get_provider_info() -> dict[str, Any]:
    """What Airflow's ProvidersManager reads through the apache_airflow_provider entry point."""
    return {
        "package-name": "airflow-provider-pgq",
        "name": "PgQ",
        "description": "Move PgQ events between PostgreSQL databases exactly once.",
        "versions": [__version__],
        "integrations": [
            {"integration-name": "PgQ", "external-doc-url": "https://github.com/pgq/pgq", "tags": ["software"]}
        ],
        "hooks": [{"integration-name": "PgQ", "python-modules": ["airflow_provider_pgq.hooks.pgq"]}],
        "operators": [
            {
                "integration-name": "PgQ",
                "python-modules": [
                    "airflow_provider_pgq.operators.queue_mover",
                    "airflow_provider_pgq.operators.admin",
                ],
            }
        ],
        "sensors": [{"integration-name": "PgQ", "python-modules": ["airflow_provider_pgq.sensors.pgq"]}],
        "triggers": [{"integration-name": "PgQ", "python-modules": ["airflow_provider_pgq.triggers.pgq"]}],
        "extra-links": ["airflow_provider_pgq.links.mover_page.PgqMoverPageLink"],
        "queues": ["airflow_provider_pgq.queues.pgq.PgqMessageQueueProvider"],
        "connection-types": [
            {
                "hook-class-name": "airflow_provider_pgq.hooks.pgq.PgqHook",
                "hook-name": "PgQ",
                "connection-type": "pgq",
                "ui-field-behaviour": {"relabeling": {"schema": "Database"}, "hidden-fields": []},
            }
        ],
    }
