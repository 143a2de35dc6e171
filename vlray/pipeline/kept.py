"""Kept input columns (``input.keep_columns``) on their way from the reader to ``embeddings/``.

Between the stages, Ray Data turns Arrow blocks into NumPy batches and back, which loses Arrow
types (an int64 column with nulls comes back as float64, a list as a NumPy array, a timestamp as
datetime64). So the reader packs each row's kept values into one binary cell, ``kept``: an Arrow
IPC stream of that single row, schema included. Every stage passes the cell on untouched, rows
may be reordered or split freely, and the writer unpacks the cells into columns typed exactly as
in the input (about 0.5 KB and a few microseconds per row, small beside the image).
"""

from __future__ import annotations

import pyarrow as pa

KEPT_COLUMN = "kept"
"""Binary column of the pipeline rows holding each row's kept values (see the module doc)."""

RESERVED = frozenset({"id", "embedding", "width", "height", "error", "metadata"})
"""Names a kept column cannot take: the output columns and the query hit's own keys."""


def to_cells(table: pa.Table) -> list[bytes]:
    """One IPC stream per row of ``table`` (the kept columns of a block)."""
    cells = []
    for i in range(table.num_rows):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(i, 1))
        cells.append(sink.getvalue().to_pybytes())
    return cells


def empty_cells(n: int) -> list[bytes]:
    """Cells of rows that carry no kept values (rows that failed before they were read)."""
    return [b""] * n


def from_cells(cells: list[bytes]) -> pa.Table | None:
    """The kept columns of the rows whose cells are given, in order; None when no row has any.

    Raises:
        ValueError: some rows have cells and others not (rows of two inputs in one batch).
    """
    full = [c for c in cells if len(c)]
    if not full:
        return None
    if len(full) != len(cells):
        raise ValueError(f"{len(cells) - len(full)} of {len(cells)} rows carry no kept columns")
    tables = [pa.ipc.open_stream(pa.py_buffer(c)).read_all() for c in full]
    return pa.concat_tables(tables).combine_chunks()
