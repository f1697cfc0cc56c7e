"""Tidy tables: a list of row dicts that writes and reads CSV."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Column order of layers.csv (DESIGN.md); other columns follow in first-seen order.
LAYER_COLUMNS = [
    "run", "epoch", "split", "view", "layer", "block", "dim", "n",
    "nc1", "cdnv_mean", "nc2", "ncc_acc", "probe_acc", "nc1_classic",
]  # fmt: skip


class Table(list):
    """Rows of a tidy table (one dict per row), with CSV input and output.

    `table.column("nc1")`, `table.where(split="test", view="clean")`,
    `table.to_csv(path)`, `Table.from_csv(path)`, `table.to_pandas()`.
    """

    def __init__(self, rows: Iterable[dict] = (), **attrs: Any) -> None:
        super().__init__(dict(r) for r in rows)
        self.meta: dict[str, Any] = attrs

    @property
    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self:
            for key in row:
                seen.setdefault(key, None)
        order = [c for c in LAYER_COLUMNS if c in seen]
        return order + [c for c in seen if c not in order]

    def column(self, name: str) -> list:
        return [row.get(name) for row in self]

    def where(self, **match: Any) -> Table:
        return Table((r for r in self if all(r.get(k) == v for k, v in match.items())), **self.meta)

    def to_csv(self, path: str | Path, append: bool = False) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cols = self.columns
        write_header = not (append and path.exists() and path.stat().st_size > 0)
        if not write_header:
            with open(path, newline="") as f:
                cols = next(csv.reader(f))
        with open(path, "a" if append else "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            if write_header:
                writer.writeheader()
            for row in self:
                writer.writerow({k: _fmt(row.get(k)) for k in cols})
        return path

    @classmethod
    def from_csv(cls, path: str | Path) -> Table:
        with open(path, newline="") as f:
            return cls({k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f))

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


def _parse(text: str) -> Any:
    if text == "":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text
