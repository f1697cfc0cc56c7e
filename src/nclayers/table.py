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
from pathlib import Path
from typing import Any

from nclayers.errors import NCLayersError
from nclayers.files import atomic_write

TEXT, INT, FLOAT, BOOL = str, int, float, bool

# Known columns and their types; their order is the column order of layers.csv.
COLUMNS: dict[str, type] = {
    "run": TEXT, "epoch": INT, "split": TEXT, "view": TEXT, "input": TEXT, "layer": INT,
    "block": TEXT, "dim": INT, "n": INT, "nc1": FLOAT, "cdnv_mean": FLOAT, "nc2": FLOAT,
    "ncc_acc": FLOAT, "probe_acc": FLOAT, "nc1_classic": FLOAT,
    "probe_lr": FLOAT, "probe_underfit": BOOL,  # issue 24 (layers.csv, probe.csv)
    # memorization.csv
    "nc1_clean": FLOAT, "nc1_noisy": FLOAT, "nc1_corrupted": FLOAT, "ratio": FLOAT,
    "memorizing": BOOL, "nc1_changed_clean": FLOAT, "nc1_changed_noisy": FLOAT,
    "ratio_changed": FLOAT,
    # probe.csv, prune.csv, equality.csv, runs.csv
    "lr": FLOAT, "loss": FLOAT, "train_loss": FLOAT, "train_acc": FLOAT, "test_loss": FLOAT,
    "test_acc": FLOAT, "variant": TEXT, "kind": TEXT, "layers": TEXT, "blocks": TEXT,
    "seed": INT, "finetune_epochs": INT, "n_removed": INT, "redundant": BOOL,
    "index": INT, "folder": TEXT, "errors": TEXT, "stale": TEXT,
    "finetune_lr": FLOAT, "baseline_drop": FLOAT, "baseline_flag": BOOL,  # issue 24 (prune.csv)
}  # fmt: skip
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


__all__ = ["COLUMNS", "Table"]
