"""The `nclayers equality` job: are all layers equal, for each run of a folder.

Reads a layers.csv (given, in a run folder, or in each run folder of a sweep), fits the
law of separation against a decay-flat-decay plateau, applies the plateau rule, and
writes beside each table: equality.csv (per block: enhancement, fits, residuals,
redundant), equality.json (per curve: the fit, the verdict, the rule, the redundant
blocks) and equality[-RUN].png; for a split other than test the names end in -SPLIT
(equality-train.csv, ...), so fits of both splits live side by side. Where the run
folder holds a prune.csv, the pruning result is read back too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from nclayers.equality import (
    CurveReport,
    analyze_equality,
    equality_table,
    format_equality,
    plot_equality,
    summary_row,
)
from nclayers.errors import NCLayersError
from nclayers.jobs.folder import CONFIG, LAYERS, PRUNE, RunFolder
from nclayers.prune import prune_summary
from nclayers.table import Table

EQUALITY = "equality"  # equality.csv, equality.json, equality.png (+ "-SPLIT" off test)


@dataclass
class EqualityResult:
    """One layers table's answer: a report per curve, and the pruning summary if any."""

    source: Path
    reports: list[CurveReport]
    prune_text: str | None = None
    written: list[Path] = field(default_factory=list)

    def format(self) -> str:
        parts = [f"# {self.source}"]
        parts += [format_equality(r) for r in self.reports]
        if self.prune_text:
            parts.append("pruning (prune.csv):\n" + self.prune_text)
        return "\n\n".join(parts)


def layer_tables(target: str | Path) -> list[Path]:
    """The layers.csv files `target` names: the file itself, a run folder's, or those of
    every run folder below a sweep folder."""
    target = Path(target)
    if target.is_file():
        return [target]
    if (target / LAYERS).is_file():
        return [target / LAYERS]
    if target.is_dir():
        found = sorted(p for p in target.rglob(LAYERS) if p.is_file())
        if found:
            return found
        raise NCLayersError(
            f"{str(target)!r} holds no {LAYERS}; run `nclayers analyze` on the run first"
        )
    raise NCLayersError(f"{str(target)!r} is neither a layers.csv nor a run or sweep folder")


def equality_run(target: str | Path, cfg, plot: bool = True) -> list[EqualityResult]:
    """Answer "are all layers equal?" for every layers.csv under `target`.

    cfg: an `EqualityConfig` (split, view, plateau_fraction, plateau_min_run, bic_margin).
    """
    results = []
    for path in layer_tables(target):
        reports = analyze_equality(
            Table.from_csv(path), split=cfg.split, view=cfg.view,
            fraction=cfg.plateau_fraction, min_run=cfg.plateau_min_run,
            margin=cfg.bic_margin,
        )  # fmt: skip
        folder = RunFolder(path.parent)
        result = EqualityResult(path, reports)
        if folder.exists(PRUNE):
            result.prune_text = prune_summary(Table.from_csv(folder.file(PRUNE)))
        stem = EQUALITY if cfg.split == "test" else f"{EQUALITY}-{_slug(cfg.split)}"
        result.written.append(equality_table(reports).to_csv(folder.file(f"{stem}.csv")))
        payload = [summary_row(r) for r in reports]
        result.written.append(folder.write_json(f"{stem}.json", payload))
        if plot:
            for rep in reports:
                name = _slug(rep.key.get("run")) if len(reports) > 1 else ""
                png = folder.file(f"{stem}-{name}.png" if name else f"{stem}.png")
                result.written.append(plot_equality(rep, png))
        if folder.exists(CONFIG):  # a run folder (not a loose layers.csv): record the stage
            verdicts = {str(r.key.get("run")): r.fit.preferred for r in reports}
            folder.mark_done("equality", verdicts=verdicts)
        results.append(result)
    return results


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(value or "")).strip("_")
