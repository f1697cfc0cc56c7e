"""The `nclayers equality` job: are all layers equal, for a run or every run of a folder.

For a run folder (`equality_job(cfg, folder)`, the sweep's stage): reads its layers.csv,
fits the law of separation against a decay-flat-decay plateau with `cfg.equality`,
applies the plateau rule, and writes equality.csv (per block: enhancement, fits,
residuals, redundant), equality.json (per curve: the fit, the verdict, the rule, the
redundant blocks) and equality[-RUN].png; for a split other than test the names end in
-SPLIT, so fits of both splits live side by side. `prune --blocks plateau` reads the
redundant blocks back from equality.json when it is up to date, so the two always agree.

`equality_tables(target, cfg)` does the same beside every layers.csv under a sweep
folder, or for one loose layers.csv.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nclayers.config import Config, EqualityConfig
from nclayers.equality import (
    CurveReport,
    analyze_equality,
    equality_table,
    format_equality,
    summary_row,
)
from nclayers.errors import NCLayersError
from nclayers.jobs.common import run_folder
from nclayers.jobs.folder import (
    EQUALITY,
    LAYERS,
    PRUNE,
    STAGES,
    RunFolder,
    equality_stem,
    slug,
)
from nclayers.prune import prune_summary
from nclayers.report.equality_figures import plot_equality
from nclayers.table import Table


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


def equality_job(
    cfg: Config, folder: RunFolder | str | Path, *, progress: bool = True, plot: bool = True
) -> EqualityResult:
    """Answer "are all layers equal?" for the run in `folder` (its layers.csv)."""
    folder = run_folder(folder)
    with folder.lock():
        if not folder.exists(LAYERS):
            raise NCLayersError(
                f"{folder.path} holds no {LAYERS}; run `nclayers analyze {folder.path}` first"
            )
        folder.check_inputs(STAGES, PRUNE)
        result = _answer(folder, folder.layers(), cfg.equality, plot)
        verdicts = {str(r.key.get("run")): r.fit.preferred for r in result.reports}
        folder.mark_done("equality", cfg, verdicts=verdicts)
    return result


def equality_tables(target: str | Path, ec: EqualityConfig, plot: bool = True):
    """The equality answer beside every layers.csv that `target` names: the file itself,
    a run folder's, or those of every run folder below a sweep folder."""
    return [_answer(RunFolder(p.parent), Table.from_csv(p), ec, plot) for p in _tables(target)]


def _answer(folder: RunFolder, layers: Table, ec: EqualityConfig, plot: bool) -> EqualityResult:
    reports = analyze_equality(
        layers, split=ec.split, view=ec.view, fraction=ec.plateau_fraction,
        min_run=ec.plateau_min_run, margin=ec.bic_margin,
    )  # fmt: skip
    result = EqualityResult(folder.file(LAYERS), reports)
    if folder.exists(PRUNE):
        result.prune_text = prune_summary(folder.read_table(PRUNE))
    stem = equality_stem(ec)
    result.written.append(folder.write_table(f"{stem}.csv", equality_table(reports)))
    result.written.append(folder.write_json(f"{stem}.json", [summary_row(r) for r in reports]))
    for rep in reports if plot else ():
        name = slug(rep.key.get("run")) if len(reports) > 1 else ""
        png = f"{stem}-{name}.png" if name else f"{stem}.png"
        drawn = folder.draw(png, lambda path, rep=rep: plot_equality(rep, path))
        result.written += [drawn] if drawn is not None else []
    return result


def _tables(target: str | Path) -> list[Path]:
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


__all__ = ["EQUALITY", "EqualityResult", "equality_job", "equality_stem", "equality_tables"]
