"""Parquet files, read in record batches so a large file never sits in memory whole."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
from collections.abc import Iterator
from typing import Any

from llmcycle.config import field_help as F
from llmcycle.data.document import Document
from llmcycle.data.readers.base import FileParams, Problems, Reader, register_reader
from llmcycle.data.readers.jsonl import PATHS_HELP


def jsonable(v: Any) -> Any:
    """A value as JSON can store it: dates as ISO strings, decimals as strings, bytes as base64."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (datetime.date, datetime.time)):  # datetime is a date
        return v.isoformat()
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(v).decode("ascii")
    if isinstance(v, decimal.Decimal):
        return str(v)
    return str(v)


@register_reader
class ParquetReader(Reader):
    name = "parquet"

    @dataclasses.dataclass
    class Params(FileParams):
        paths: list[str] = F([], PATHS_HELP)
        text_column: str = F("text", "Column holding the document text (string).")
        id_column: str | None = F("id", "Column holding the document id; without one the id is file:row.")
        batch_size: int = F(1024, "Rows read at a time.")

    def read(self, file: str, problems: Problems) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = self.params
        try:
            pf = pq.ParquetFile(file)
            names = pf.schema_arrow.names
        except (OSError, ValueError, pa.ArrowException) as e:  # ArrowInvalid is a ValueError
            problems.report("unreadable_file", file, None, str(e))
            return
        if p.text_column not in names:
            problems.report("missing_text", file, None, f"no column {p.text_column!r}")
            return
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=max(1, p.batch_size)):
                cols = {name: batch.column(i).to_pylist() for i, name in enumerate(batch.schema.names)}
                texts = cols.pop(p.text_column)
                ids = cols.pop(p.id_column, None) if p.id_column else None
                for i, text in enumerate(texts):
                    r = row + i
                    if not isinstance(text, str):
                        problems.report("missing_text", file, r, f"{type(text).__name__}, not a string")
                        continue
                    rid = ids[i] if ids is not None else None
                    yield Document(
                        id=f"{file}:{r}" if rid is None or rid == "" else str(jsonable(rid)),
                        text=text,
                        source=file,
                        metadata={k: jsonable(v[i]) for k, v in cols.items()},
                    )
                row += batch.num_rows
        except (OSError, ValueError, pa.ArrowException) as e:
            problems.report("unreadable_file", file, row, str(e))
