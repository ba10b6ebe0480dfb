"""The PgQ page of the Airflow UI: every mover's position, lag and last runs.

``movers`` finds the movers in serialized DAGs, ``live`` reads their positions (one
statement per database, bounded, cached), ``history`` their last runs' reports, ``state``
the colour rule; ``app`` serves them behind Airflow's auth manager and ``plugin``
registers the page. Only ``app`` and ``plugin`` import the API server's modules.
"""
