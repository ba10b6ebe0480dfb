"""OpenLineage for the mover: the source and target queues as datasets of a run that moved events.

Naming follows the postgres provider (``PostgresHook.get_openlineage_database_info``), so a
queue sits next to the tables other tasks report on the same server: namespace
``postgres://<host>:<port>``, name ``<database>.pgq.<queue>`` (PgQ keeps a queue in its
``pgq`` schema); see ``queue_mover.queue_dataset_address``, which needs no openlineage.

The target dataset carries the moved event count as ``outputStatistics.rowCount``; the
source dataset carries the tick range the run consumed as the input facet ``pgqTickRange``
(``PgqTickRangeInputDatasetFacet``, schema in docs/openlineage/).

Imports openlineage at module level: the operator imports this module only inside its
OpenLineage methods, which the openlineage provider alone calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attr
from airflow.providers.openlineage.extractors import OperatorLineage
from openlineage.client.event_v2 import InputDataset, OutputDataset
from openlineage.client.facet_v2 import InputDatasetFacet, output_statistics_output_dataset

#: Where the facet's JSON schema lives: docs/openlineage/PgqTickRangeInputDatasetFacet.json
#: of this package's repository (OpenLineage only asks for a URI that names the schema).
TICK_RANGE_SCHEMA_URL = "urn:airflow-provider-pgq:openlineage:PgqTickRangeInputDatasetFacet:1-0-0"
TICK_RANGE_FACET = "pgqTickRange"


@attr.define
class PgqTickRangeInputDatasetFacet(InputDatasetFacet):
    """The part of a source queue one run consumed: PgQ ticks ``firstTick`` (exclusive) to
    ``lastTick`` (inclusive), in ``batches`` batches, by the consumer and tracking key named."""

    firstTick: int | None = attr.field(default=None)  # noqa: N815 - OpenLineage's camelCase
    lastTick: int | None = attr.field(default=None)  # noqa: N815
    batches: int = attr.field(default=0)
    consumer: str = attr.field(default="")
    subconsumer: str = attr.field(default="")

    # ids and names, no secrets: the provider's redaction leaves them as they are
    _additional_skip_redact: ClassVar[list[str]] = ["firstTick", "lastTick", "batches", "consumer", "subconsumer"]

    @staticmethod
    def _get_schema() -> str:
        return TICK_RANGE_SCHEMA_URL


def moved_lineage(report: Mapping[str, Any], source: tuple[str, str], target: tuple[str, str]
                  ) -> OperatorLineage[Any, Any]:
    """The datasets of a run that moved events; an empty OperatorLineage when it moved none."""
    if not report.get("events"):
        return OperatorLineage()
    ticks = PgqTickRangeInputDatasetFacet(
        firstTick=report.get("first_tick"), lastTick=report.get("last_tick"), batches=int(report.get("batches") or 0),
        consumer=str(report.get("consumer_name") or ""), subconsumer=str(report.get("subconsumer") or ""),
    )
    stats = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(rowCount=int(report["events"]))
    return OperatorLineage(
        inputs=[InputDataset(namespace=source[0], name=source[1], inputFacets={TICK_RANGE_FACET: ticks})],
        outputs=[OutputDataset(namespace=target[0], name=target[1], outputFacets={"outputStatistics": stats})],
    )
