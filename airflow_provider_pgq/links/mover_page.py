"""From a mover's task instance to its row on the PgQ page."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from airflow.sdk import BaseOperatorLink

#: Where the plugin's app is mounted (ui/plugin.py).
PAGE_PREFIX = "/pgq"


def page_url(base_url: str, row_key: str) -> str:
    """The page with ``row_key``'s row highlighted and scrolled into view."""
    anchor = quote(row_key, safe="")
    return f"{base_url.rstrip('/')}{PAGE_PREFIX}/?mover={anchor}#{anchor}"


class PgqMoverPageLink(BaseOperatorLink):
    """The "PgQ movers" button of a mover task instance."""

    name = "PgQ movers"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        from airflow.sdk.configuration import conf

        key = f"{ti_key.dag_id}.{ti_key.task_id}"
        if getattr(ti_key, "map_index", -1) >= 0:
            key += f"[{ti_key.map_index}]"
        return page_url(conf.get("api", "base_url", fallback="") or "", key)
