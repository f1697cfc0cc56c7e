"""The tidy result table every stage returns and writes: rows of dicts, typed columns.

`Table` is a list of row dicts with CSV input and output. Its column schema declares
each known column's type (`COLUMNS`; a table may add its own, e.g. a sweep's axes as
text), so a CSV round trip gives back what was written: a block named "0" stays the
text "0", a `memorizing` flag stays a bool, an empty `run` stays "". Unknown columns
are read as int, float, bool or text, whichever fits.

`to_csv` writes atomically (a kill leaves the old file or the new one). `from_csv`
refuses a damaged file (a row with too few or too many fields, a value of the wrong
type, a file cut before its last line ended), naming the file and the line.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nclayers.errors import NCLayersError
from nclayers.files import atomic_write

TEXT, INT, FLOAT, BOOL = str, int, float, bool


@dataclass(frozen=True)
class Column:
    """One known column: its name and type; for a per-block metric, the stage that
    measures it into layers.csv, its label on a figure's axis, whether that axis is
    logarithmic, and whether the CLI, the report and `nclayers plot` show it."""

    name: str
    type: type
    stage: str | None = None
    label: str | None = None
    log: bool = False
    shown: bool = False


def _c(name: str, kind: type, stage: str | None = None, label: str | None = None,
       log: bool = False, shown: bool = True) -> Column:  # fmt: skip
    return Column(name, kind, stage, label, log, shown and stage is not None)


# Every known column, once; their order is the column order of layers.csv. A new metric
# of a stage is one line here (and the stage's rows carrying it).
SCHEMA: tuple[Column, ...] = (
    _c("run", TEXT), _c("epoch", INT), _c("split", TEXT), _c("view", TEXT), _c("input", TEXT),
    _c("layer", INT), _c("block", TEXT), _c("dim", INT),
    _c("n", INT, "analyze", shown=False),
    _c("nc1", FLOAT, "analyze", "NC1 (sum of CDNV)", log=True),
    _c("cdnv_mean", FLOAT, "analyze", "mean CDNV", log=True, shown=False),
    _c("nc2", FLOAT, "analyze", "NC2 (distance to ETF)"),
    _c("ncc_acc", FLOAT, "analyze", "NCC accuracy"),
    _c("probe_acc", FLOAT, "probe", "linear-probe accuracy"),
    _c("probe_lr", FLOAT, "probe", "probe learning rate (chosen on held-out rows)", log=True),
    # derived in the layers view: probe_acc more than 2 points below ncc_acc
    _c("probe_underfit", BOOL),
    _c("nc1_classic", FLOAT, "analyze", shown=False), _c("measurement", TEXT),
    # memorization.csv
    _c("nc1_clean", FLOAT), _c("nc1_noisy", FLOAT), _c("nc1_corrupted", FLOAT),
    _c("ratio", FLOAT, label="memorization ratio Δ = NC1 clean / NC1 noisy"),
    _c("memorizing", BOOL), _c("nc1_changed_clean", FLOAT), _c("nc1_changed_noisy", FLOAT),
    _c("ratio_changed", FLOAT),
    # probe.csv, prune.csv, equality.csv, runs.csv
    _c("lr", FLOAT), _c("loss", FLOAT), _c("train_loss", FLOAT), _c("train_acc", FLOAT),
    _c("test_loss", FLOAT), _c("test_acc", FLOAT), _c("variant", TEXT), _c("kind", TEXT),
    _c("layers", TEXT), _c("blocks", TEXT), _c("seed", INT), _c("finetune_epochs", INT),
    _c("n_removed", INT), _c("redundant", BOOL), _c("index", INT), _c("folder", TEXT),
    _c("errors", TEXT), _c("stale", TEXT),
    _c("finetune_lr", FLOAT), _c("baseline_drop", FLOAT), _c("baseline_flag", BOOL),
)  # fmt: skip
COLUMNS: dict[str, type] = {c.name: c.type for c in SCHEMA}
LABELS: dict[str, str] = {c.name: c.label for c in SCHEMA if c.label}
LOG_SCALE: frozenset[str] = frozenset(c.name for c in SCHEMA if c.log)


def stage_columns(stage: str) -> tuple[str, ...]:
    """The columns `stage` measures into layers.csv."""
    return tuple(c.name for c in SCHEMA if c.stage == stage)


def shown_columns(stage: str | None = None) -> list[str]:
    """The per-block metrics shown by the CLI, the report's table and `nclayers plot`
    (of one stage, or of all)."""
    return [c.name for c in SCHEMA if c.shown and (stage is None or c.stage == stage)]


_BOOLS = {"True": True, "False": False, "true": True, "false": False}


class Table(list):
    """Rows of a tidy table (one dict per row), with typed CSV input and output.

    `table.column("nc1")`, `table.where(split="test", view="clean")`,
    `table.to_csv(path)`, `Table.from_csv(path)`, `table.to_pandas()`.
    `schema` adds column types to `COLUMNS` (e.g. `{"noise": str}`).
    """

    def __init__(
        self, rows: Iterable[Mapping] = (), schema: Mapping[str, type] | None = None
    ) -> None:
        super().__init__(dict(r) for r in rows)
        self.schema: dict[str, type] = {**COLUMNS, **(schema or {})}

    @property
    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self:
            for key in row:
                seen.setdefault(key, None)
        order = [c for c in COLUMNS if c in seen]
        return order + [c for c in seen if c not in order]

    def column(self, name: str) -> list:
        return [row.get(name) for row in self]

    def where(self, **match: Any) -> Table:
        """The rows whose columns equal `match` ("" and None count as the same text)."""
        return self._like(r for r in self if all(_same(r.get(k), v) for k, v in match.items()))

    def _like(self, rows: Iterable[Mapping]) -> Table:
        """A table of `rows` with this table's class and schema."""
        return Table(rows, self.schema)

    # ----------------------------------------------------------------- CSV
    def to_csv_text(self, columns: list[str] | None = None) -> str:
        cols = columns or self.columns
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self:
            writer.writerow({k: _fmt(row.get(k)) for k in cols})
        return buf.getvalue()

    def to_csv(self, path: str | Path) -> Path:
        """Write the table to `path` atomically; returns the path."""
        return atomic_write(path, self.to_csv_text())

    @classmethod
    def from_csv(cls, path: str | Path, schema: Mapping[str, type] | None = None) -> Table:
        """Read a CSV written by `to_csv`; a damaged file raises `NCLayersError`."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise NCLayersError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as err:
            raise NCLayersError(f"{path}: unreadable ({err}); it is damaged") from None
        return cls.from_csv_text(text, str(path), schema)

    @classmethod
    def from_csv_text(
        cls, text: str, name: str = "CSV", schema: Mapping[str, type] | None = None
    ) -> Table:
        table = cls(schema=schema)
        if not text.strip():
            raise NCLayersError(f"{name}: empty file (no header); it is damaged")
        if not text.endswith("\n"):
            raise NCLayersError(f"{name}: the last line is cut off; the file is damaged")
        try:
            reader = csv.reader(io.StringIO(text, newline=""), strict=True)
            header = next(reader)
            rows = list(reader)
        except csv.Error as err:
            raise NCLayersError(f"{name}: not valid CSV ({err}); the file is damaged") from None
        if len(set(header)) != len(header) or "" in header:
            raise NCLayersError(f"{name}: bad header {header}; the file is damaged")
        for line, fields in enumerate(rows, start=2):
            if len(fields) != len(header):
                raise NCLayersError(
                    f"{name}: line {line} has {len(fields)} fields, the header {len(header)}; "
                    "the file is damaged"
                )
            row = {}
            for key, text_value in zip(header, fields, strict=True):
                try:
                    row[key] = _parse(text_value, table.schema.get(key))
                except ValueError:
                    raise NCLayersError(
                        f"{name}: line {line}, column {key!r}: {text_value!r} is not "
                        f"{table.schema[key].__name__}; the file is damaged"
                    ) from None
            table.append(row)
        return table

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(list(self), columns=self.columns)

    def format(self, columns: list[str] | None = None, floatfmt: str = ".4g") -> str:
        """A fixed-width text rendering for the terminal."""
        cols = columns or self.columns
        cells = [[_show(r.get(c), floatfmt) for c in cols] for r in self]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
        return "\n".join(lines)


def _same(a: Any, b: Any) -> bool:
    return a == b or (a in (None, "") and b in (None, ""))


def _fmt(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest round-trip form: CSV keeps every digit
    return value


def _show(value: Any, floatfmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value)


def _parse(text: str, kind: type | None) -> Any:
    """One CSV field: by its declared type, else whichever of int, float, bool fits."""
    if kind is TEXT:
        return text
    if text == "":
        return None
    if kind is BOOL or (kind is None and text in _BOOLS):
        if text not in _BOOLS:
            raise NCLayersError(text)
        return _BOOLS[text]
    if kind is INT:
        return int(text)
    if kind is FLOAT:
        return float(text)
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


__all__ = ["COLUMNS", "LABELS", "LOG_SCALE", "SCHEMA", "Column", "Table", "shown_columns",
           "stage_columns"]  # fmt: skip
