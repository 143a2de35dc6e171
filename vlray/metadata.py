"""Kept input columns of query hits: ``metadata`` (column name -> JSON value) read from the job's
``embeddings/`` files, beside the index (``OUT/index`` -> ``OUT/embeddings``).

Only the id and the kept columns are read (never the vectors), once, on the first hit that needs
them; lookups are then a dict access. Memory is that of the kept columns themselves.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import logging
import math
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlray.config import S3Config
from vlray.storage import Location, list_files, locate

logger = logging.getLogger(__name__)

BASE_COLUMNS = frozenset({"id", "embedding", "width", "height"})
"""Columns of ``embeddings/`` that are not kept input columns."""


def json_value(value: Any) -> Any:
    """A Python value of an Arrow cell as JSON: dates as ISO 8601, bytes as base64, decimals as
    strings, NaN and infinities as null; lists and structs (dicts) element by element."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], tuple) and len(value[0]) == 2:  # an Arrow map
            return {str(k): json_value(v) for k, v in value}
        return [json_value(v) for v in value]
    return value


def embeddings_uri(index_uri: str) -> str:
    """``OUT/embeddings`` for the index at ``OUT/index``."""
    return index_uri.rstrip("/").rsplit("/", 1)[0] + "/embeddings"


class HitMetadata:
    """The kept columns of every committed embedding, by id."""

    def __init__(self, table: pa.Table) -> None:
        """``table``: an ``id`` column and the kept columns."""
        self.columns = [c for c in table.column_names if c != "id"]
        self._rows: dict[str, int] = {}
        self._table = table
        if self.columns:
            for i, item_id in enumerate(table.column("id").to_pylist()):
                self._rows.setdefault(item_id, i)

    @classmethod
    def load(cls, embeddings: Location) -> HitMetadata:
        """Reads id + kept columns of every ``embeddings/*.parquet`` (none there: no columns)."""
        tables = []
        for path in list_files(embeddings, (".parquet",)):
            with embeddings.fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                names = [n for n in parquet.schema_arrow.names if n not in BASE_COLUMNS]
                if names:  # files of runs without kept columns hold nothing to read
                    tables.append(parquet.read(columns=["id", *names]))
        if not tables:
            return cls(pa.table({"id": pa.array([], pa.string())}))
        return cls(pa.concat_tables(tables, promote_options="default").combine_chunks())

    @classmethod
    def for_index(cls, index_uri: str, s3: S3Config | None = None) -> HitMetadata:
        """The metadata beside the index at ``index_uri``; unreadable: none, with a warning."""
        try:
            return cls.load(locate(embeddings_uri(index_uri), s3))
        except (OSError, ValueError, pa.ArrowException) as exc:
            logger.warning("no hit metadata: cannot read %s (%s)", embeddings_uri(index_uri), exc)
            return cls(pa.table({"id": pa.array([], pa.string())}))

    def get(self, item_id: str) -> dict[str, Any] | None:
        """The kept columns of ``item_id`` (None: no kept columns, or an unknown id)."""
        row = self._rows.get(item_id)
        if row is None:
            return None
        return {name: json_value(self._table.column(name)[row].as_py()) for name in self.columns}

    def attach(self, hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``hits`` with a ``metadata`` object on each hit whose id has kept columns."""
        if not self.columns:
            return hits
        for hit in hits:
            found = self.get(str(hit["id"]))
            if found is not None:
                hit["metadata"] = found
        return hits
