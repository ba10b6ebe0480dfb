"""``python -m airflow_provider_pgq.cli``: the same as the pgq-queue-mover script."""

import sys

from airflow_provider_pgq.cli import main

sys.exit(main())
