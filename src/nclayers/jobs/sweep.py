"""`nclayers sweep FILE`: a grid of runs, their stages, one tidy table, figures and a report.

A sweep file (YAML) holds

    name: fig3-cpu-mini            # default: the file's stem
    title: "..."                   # shown on the figure and the report
    root: runs/paper               # run folders: ROOT/runs/<id>; outputs: ROOT/<name>/
    base: ../resnet18-cifar10.yaml # config file(s) (relative to this file) or a mapping
    config: {train.epochs: 30}     # settings on top of base (nested or dotted keys)
    axes:                          # the grid: the product of every axis, in file order
      model:                       # a value is a mapping of settings with a label ...
        - {label: ResNet18, model.name: resnet18}
      train.seed: [0, 1, 2]        # ... or a plain value of the config key named by the axis
    stages: [train, analyze, probe]
    figures:                       # or `figure:` with one mapping
      - {layout: noisy, rows: model, curves: noise, x: block}
    report: true
    mathtext: false                # labels are plain text unless true
    slurm: {partition: gpu, gpus_per_run: 1, time_min: 600, array_parallelism: 8}

Every run's config is resolved (defaults <- base <- config <- command-line overrides <-
its axis values, validated once) up front, so `--print` checks the whole file. A run
lives in ROOT/runs/<id>, <id> a short hash of the settings that define its weights
(`config.weights_settings`), so sweeps that contain the same run share its folder and its
work; how a run is measured (analyze.*, probe.*) is recorded per stage instead.

A stage is a job, `job(cfg, folder, *, progress)`. Running a sweep runs every stage that
is not done or is out of date (other weights or settings, see `RunFolder.status`), under
the run folder's lock, and skips the others; an interrupted training resumes from its
checkpoint. A user error (`NCLayersError`) is recorded against the run and the sweep goes
on; any other exception is a bug: recorded with its traceback (error.log), printed, and
the sweep goes on too. A run's memorization stage is "n/a" when the run has no ratio to
measure (a figure's clean baseline: no label noise, no corruption). Then the runs' tables
are gathered into tidy CSVs (a column per axis), the figures are drawn (a figure that fails
costs itself, not the report) and the report written, all in ROOT/<name>/.

Launchers: in this process (default); `--gpus 0,1` one run per GPU through submitit's
local executor; `--launcher slurm` one Slurm job array through submitit, each task
requeued on preemption or timeout and continuing from its checkpoint; `--print` and
`--index I` for any other scheduler.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import shlex
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from nclayers.config import Config, compose, weights_settings
from nclayers.errors import NCLayersError
from nclayers.files import atomic_write, dumps_json
from nclayers.jobs.stages import ORDER, STAGES
from nclayers.table import Table

ID_LENGTH = 12
STAGE_ORDER = ORDER  # each stage after those it needs (nclayers.jobs.stages)
StageName = Literal[STAGE_ORDER]  # type: ignore[valid-type]
NOT_APPLICABLE = "n/a"  # the status of a stage that does not apply to a run
FAILED = ("failed", "blocked")  # the statuses of a stage that did not run to the end


def stage_failed(record: dict) -> bool:
    """Whether a stage's status record says it failed (or was blocked by one that did)."""
    return record.get("status") in FAILED


# A stage runs after these (when they are in the sweep) and is blocked when they fail.
NEEDS = {s.name: s.needs for s in STAGES if s.needs}
log = logging.getLogger("nclayers.sweep")


def stage_jobs() -> dict[str, Callable]:
    """The sweep's stages: each is the plain job of its verb."""
    return {s.name: s.load() for s in STAGES}


# ----------------------------------------------------------------------------- the file
class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FigureSpec(_Spec):
    layout: str = "clean"
    panels: list[str] | None = None
    rows: str | None = None
    curves: str | None = None
    x: Literal["block", "depth"] = "block"
    name: str | None = None
    title: str | None = None


class SlurmSpec(_Spec):
    """Where and how a sweep's runs go on Slurm (keys of `slurm:`, or slurm.KEY=VALUE)."""

    partition: str | None = None
    gpus_per_run: int = Field(0, ge=0)
    cpus_per_run: PositiveInt = 4
    mem_gb: float | None = Field(None, gt=0)
    time_min: PositiveInt = 600  # per run; a run cut off by it is requeued and resumes
    array_parallelism: PositiveInt = 32
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: list[str] = Field(default_factory=list)  # shell lines before each task
    max_requeues: int = Field(3, ge=0)


class SweepSpec(_Spec):
    name: str | None = None
    title: str | None = None
    description: str = ""
    root: str = "runs/sweeps"
    base: str | list[str] | dict[str, Any] | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    stages: list[StageName] = Field(default_factory=lambda: ["train", "analyze"], min_length=1)
    figure: FigureSpec | None = None
    figures: list[FigureSpec] = Field(default_factory=list)
    report: bool = True
    mathtext: bool = False
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)


@dataclass
class Run:
    """One point of the grid: its axis labels, its settings and its resolved config."""

    index: int
    labels: dict[str, str]
    settings: dict[str, Any]
    config: Config
    id: str
    folder: Path


@dataclass
class Sweep:
    name: str
    title: str
    path: Path
    root: Path
    axes: dict[str, list[str]]  # axis -> labels, in order
    stages: list[str]
    figures: list[dict]
    report: bool
    runs: list[Run]
    overrides: list[str] = field(default_factory=list)
    description: str = ""
    mathtext: bool = False
    slurm: SlurmSpec = field(default_factory=SlurmSpec)

    @property
    def out(self) -> Path:
        return self.root / self.name


def run_id(cfg: Config) -> str:
    """A short hash of the settings that define a run's weights: those that differ from
    the defaults, so a config key added to nclayers later (at its default) leaves every
    existing run's id, and folder, as it was."""
    defaults = weights_settings(Config())
    mine = weights_settings(cfg)  # every spelling of clean labels is data.noise None
    kept = {k: v for k, v in mine.items() if k not in defaults or v != defaults[k]}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:ID_LENGTH]


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> Sweep:
    """Read and check a sweep file; every run's config is resolved and validated."""
    from nclayers.config import read_yaml

    path = Path(path)
    if not path.is_file():
        raise NCLayersError(f"sweep file {str(path)!r} does not exist")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise NCLayersError(f"{path}: expected a mapping at the top level")
    run_overrides, sweep_overrides = _split_overrides(overrides)
    spec = _spec(raw, path, sweep_overrides)
    _check_axis_names(spec.axes, path)
    axes = {a: _axis_values(a, v, str(path)) for a, v in spec.axes.items()}
    bases = _bases(spec, path)
    runs = []
    for index, combo in enumerate(itertools.product(*axes.values())):
        labels = {a: lab for a, (lab, _) in zip(axes, combo, strict=True)}
        settings = {k: v for _, s in combo for k, v in s.items()}
        cfg = compose(*bases, spec.config, run_overrides, settings, where=str(path))
        rid = run_id(cfg)
        cfg = cfg.updated({"run": rid})
        runs.append(Run(index, labels, settings, cfg, rid, Path(spec.root) / "runs" / rid))
    _check_distinct(runs, path)
    figures = [spec.figure] if spec.figure else list(spec.figures)
    return Sweep(
        name=spec.name or path.stem, title=spec.title or spec.name or path.stem, path=path,
        root=Path(spec.root), axes={a: [lab for lab, _ in v] for a, v in axes.items()},
        stages=[s for s in STAGE_ORDER if s in spec.stages],
        figures=[_check_figure(f, axes, path) for f in figures], report=spec.report,
        runs=runs, overrides=list(overrides), description=spec.description,
        mathtext=spec.mathtext, slurm=spec.slurm,
    )  # fmt: skip


def _split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Command-line key=value: slurm.* set the sweep's launcher, the rest every run."""
    sweep = [o for o in overrides if o.startswith("slurm.")]
    return [o for o in overrides if not o.startswith("slurm.")], sweep


def _spec(raw: dict, path: Path, sweep_overrides: list[str]) -> SweepSpec:
    from nclayers.config import _merge, _nested, parse_override

    for text in sweep_overrides:
        key, value = parse_override(text)
        raw = _merge(raw, _nested({key: value}, f"override {text!r}"))
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            prefix, section = _section_keys(e["loc"][:-1])
            valid = ", ".join(prefix + name for name in section)
            given = [t for t in sweep_overrides if parse_override(t)[0] == key]
            where = f"the override {given[-1]!r}" if given else str(path)
            raise NCLayersError(f"{where}: unknown key {key!r}; valid keys: {valid}") from None
        raise NCLayersError(f"{path}: {key}: {e['msg']} (got {e.get('input')!r})") from None


def _section_keys(loc: tuple) -> tuple[str, dict]:
    """The dotted prefix and the fields of the section an error location points into
    (slurm.partitio: slurm's keys, not the sweep's top level)."""
    model: type[BaseModel] = SweepSpec
    prefix = ""
    for part in loc:
        ann = getattr(model.model_fields.get(str(part)), "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        model, prefix = ann, f"{prefix}{part}."
    return prefix, model.model_fields


def _bases(spec: SweepSpec, path: Path) -> list:
    """The base config files (relative to the sweep file) or mapping, in order."""
    if spec.base is None:
        return []
    if isinstance(spec.base, dict):
        return [spec.base]
    names = [spec.base] if isinstance(spec.base, str) else spec.base
    files = [(path.parent / n).resolve() for n in names]
    for name, f in zip(names, files, strict=True):
        if not f.is_file():
            raise NCLayersError(f"{path}: base {name!r} does not exist ({f})")
    return files


def _axis_values(axis: str, values: list, where: str) -> list[tuple[str, dict]]:
    if not values:
        raise NCLayersError(f"{where}: axis {axis!r} needs a non-empty list of values")
    out = []
    for value in values:
        if isinstance(value, Mapping):
            settings = {k: v for k, v in value.items() if k != "label"}
            if not settings:
                raise NCLayersError(f"{where}: axis {axis!r} value {value!r} sets no config key")
            label = value.get("label")
            if label is None:
                label = ", ".join(f"{k}={v}" for k, v in settings.items())
        else:
            if "." not in axis:
                raise NCLayersError(
                    f"{where}: axis {axis!r} has plain values ({value!r}); name the axis after "
                    "the config key it sets (e.g. train.seed: [0, 1]) or give each value as a "
                    "mapping {label: ..., key: value}"
                )
            settings, label = {axis: value}, value
        out.append((str(label), settings))
    labels = [lab for lab, _ in out]
    if len(set(labels)) != len(labels):
        raise NCLayersError(f"{where}: axis {axis!r} has repeated labels {labels}")
    return out


def _check_distinct(runs: list[Run], path: Path) -> None:
    """Two grid points may share a run (an axis over how it is measured: the run is
    trained once, measured per settings), but not every setting."""
    seen: dict[str, Run] = {}
    for r in runs:
        key = json.dumps(r.config.to_dict(), sort_keys=True, default=str)
        if key in seen:
            raise NCLayersError(
                f"{path}: runs {seen[key].index} and {r.index} resolve to the same run and "
                f"settings ({seen[key].labels} vs {r.labels}); an axis value changes nothing"
            )
        seen[key] = r


def _check_axis_names(axes: Mapping[str, Any], path: Path) -> None:
    """An axis becomes a column of the sweep's tables: it may not be named like one of
    their data columns (split, view, layer, block, n, run, ...)."""
    from nclayers.table import COLUMNS

    for axis in axes:
        if axis in COLUMNS:
            raise NCLayersError(
                f"{path}: axis {axis!r} has the name of a column of the sweep's tables; "
                f"rename the axis (e.g. {axis}_: [...], or model_{axis}) and give its values "
                "as mappings {label: ..., key: value}"
            )


def _check_figure(fig: FigureSpec, axes: dict, path: Path) -> dict:
    from nclayers.report.figures import LAYOUTS

    out = fig.model_dump(exclude_none=True)
    if fig.panels is None and fig.layout not in LAYOUTS:
        raise NCLayersError(f"{path}: figure layout {fig.layout!r}; one of {sorted(LAYOUTS)}")
    for key in ("rows", "curves"):
        if out.get(key) is not None and out[key] not in axes:
            raise NCLayersError(
                f"{path}: figure {key}={out[key]!r} is not an axis; axes are {list(axes)}"
            )
    return out


# ----------------------------------------------------------------------------- one run
def commands(sweep: Sweep) -> list[str]:
    """One shell command per run, for a cluster scheduler (e.g. a Slurm job array)."""
    base = ["nclayers", "sweep", str(sweep.path), *sweep.overrides]
    return [shlex.join([*base, "--index", str(r.index)]) for r in sweep.runs]


def status_path(sweep: Sweep, run: Run) -> Path:
    return sweep.out / "status" / f"{run.index:04d}-{run.id}.json"


@contextlib.contextmanager
def out_lock(sweep: Sweep):
    """Hold the lock of the sweep's own folder (its status files, tables, figures and
    report): processes of one sweep write it in turn, and the first holder clears the
    temporary files of writes a kill cut short."""
    from filelock import FileLock

    sweep.out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(sweep.out / ".lock"), is_singleton=True)
    with lock:
        if lock.lock_counter == 1:
            for torn in [*sweep.out.glob(".*.tmp"), *sweep.out.glob("status/.*.tmp")]:
                torn.unlink(missing_ok=True)
        yield


def run_one(sweep: Sweep, index: int, progress: bool = True) -> dict:
    """Run every stage of run `index` that is not done and up to date; a failing stage is
    recorded (never raised) and the stages that need it are blocked."""
    from nclayers.jobs.folder import RunFolder

    if not 0 <= index < len(sweep.runs):
        raise NCLayersError(f"--index {index}: the sweep has runs 0..{len(sweep.runs) - 1}")
    run = sweep.runs[index]
    folder = RunFolder(run.folder)
    jobs = stage_jobs()
    status = {"index": run.index, "id": run.id, "labels": run.labels,
              "folder": str(run.folder), "stages": {}}  # fmt: skip
    failed: set[str] = set()
    for name in sweep.stages:
        blocked = [n for n in NEEDS.get(name, ()) if n in failed]
        if blocked:
            record = {"status": "blocked", "error": f"needs {blocked}, which failed"}
            failed.add(name)
        elif not _applies(name, run.config):
            record = {"status": NOT_APPLICABLE}
        else:
            with folder.lock():
                record = _run_stage(jobs[name], name, run, folder, progress)
            if record["status"] == "failed":
                failed.add(name)
        _say(sweep, run, name, record, progress)
        status["stages"][name] = record
    with out_lock(sweep):
        atomic_write(status_path(sweep, run), dumps_json(status))
    return status


def _applies(stage: str, cfg: Config) -> bool:
    """A sweep's clean baseline run (no label noise, no corruption) has no memorization
    ratio: its memorization stage is "n/a", not a failure."""
    if stage != "memorization":
        return True
    from nclayers.jobs.memorization import memorization_applies

    return memorization_applies(cfg)


def _run_stage(job: Callable, name: str, run: Run, folder, progress: bool) -> dict:
    state = folder.status(name, run.config)
    if state == "done":
        return {"status": "done", "skipped": True}
    t0 = time.perf_counter()
    try:
        job(run.config, folder, progress=progress)
        return {"status": "done", "seconds": time.perf_counter() - t0, "was": state}
    except NCLayersError as err:  # the user's to fix: one line, recorded
        error, trace = str(err), traceback.format_exc()
    except Exception as err:  # a bug: recorded with its traceback, and printed
        error = f"{type(err).__name__}: {err} (a bug in nclayers; traceback in error.log)"
        trace = traceback.format_exc()
        log.error("%s", trace)
    try:
        folder.append("error.log", f"--- stage {name}, {time.ctime()}\n{trace}\n")
    except NCLayersError as why:  # e.g. a damaged manifest: the error is still recorded
        log.warning("%s not written: %s", folder.file("error.log"), why)
    return {"status": "failed", "seconds": time.perf_counter() - t0, "error": error}


def _say(sweep: Sweep, run: Run, name: str, record: dict, progress: bool) -> None:
    failed = stage_failed(record)
    if not progress and not failed:
        return
    state = "skipped (done and up to date)" if record.get("skipped") else record["status"]
    why = f": {record['error']}" if "error" in record else ""
    level = logging.WARNING if failed else logging.INFO  # an n/a stage is no warning
    log.log(level, "[sweep %s] run %d (%s): %s %s%s", sweep.name, run.index, _describe(run),
            name, state, why)  # fmt: skip


def _describe(run: Run) -> str:
    return ", ".join(f"{a}={lab}" for a, lab in run.labels.items()) or run.id


# ----------------------------------------------------------------------------- gathering
def collect(sweep: Sweep) -> dict:
    """Gather every run's tables into ROOT/<name>/: layers.csv, memorization.csv,
    probe.csv (when any run has one), runs.csv; then draw the figures."""
    from nclayers.jobs.folder import RunFolder
    from nclayers.jobs.report import draw_figures

    out = sweep.out
    schema = dict.fromkeys(sweep.axes, str)
    tables = {n: Table(schema=schema) for n in ("layers", "memorization", "probe", "runs")}
    notes: list[str] = []
    damaged: list[str] = []  # files that could not be read: said, and the exit status says so
    for run in sweep.runs:
        folder, tag = RunFolder(run.folder), {"run": run.id, **run.labels}
        row = _run_row(sweep, run, folder, damaged)
        tables["runs"].append(row)
        if row.get("notes"):
            notes.append(f"{_describe(run)}: {row['notes']}")
        got: dict[str, Table] = {}
        # The measurements made with this sweep's settings (another sweep sharing the run
        # may have measured it differently since).
        reads = {"layers": lambda f, c: f.layers_at(c),
                 "memorization": lambda f, c: _columns_out(f.measured_rows("memorization", c),
                                                           "measurement"),
                 "probe": _probe_history}  # fmt: skip
        for key, read in reads.items():
            try:
                got[key] = read(folder, run.config)
            except NCLayersError as err:  # a damaged table is reported, the others gathered
                got[key] = Table()
                row["errors"] = "; ".join(filter(None, [row.get("errors"), str(err)]))
                damaged.append(f"run {run.index}: {err}")
        got["memorization"] = got["memorization"] or _ratios(got["layers"])
        for key, rows in got.items():
            tables[key].extend({**r, **tag} for r in rows)
    written = _write_tables(out, tables)
    errors: list[str] = []
    try:
        figures = draw_figures(sweep.figures, out, tables["layers"], tables["memorization"],
                               sweep.title, sweep.name, notes, sweep.mathtext)  # fmt: skip
    except Exception as err:  # a figure that cannot be drawn costs itself, not the report
        figures, errors = [], [f"the figure could not be drawn: {type(err).__name__}: {err}"]
        log.warning(errors[0])
    written["figures"] = [str(p) for p in figures]
    counts: dict[str, int] = {}
    for r in tables["runs"]:
        for name in sweep.stages:
            state = str(r[name]).split(":")[0]
            counts[f"{name} {state}"] = counts.get(f"{name} {state}", 0) + 1
    return {"files": written, "stages": counts, "runs": len(sweep.runs), "figure_errors": errors,
            "notes": notes, "damaged": list(dict.fromkeys(damaged))}  # fmt: skip


def _run_row(sweep: Sweep, run: Run, folder, damaged: list[str]) -> dict:
    """One row of runs.csv: labels, each stage's state now, accuracies, notes, errors."""
    from nclayers.jobs.folder import TRAIN_SUMMARY
    from nclayers.jobs.report import readability
    from nclayers.memorization import memorization_layers

    status = _read_status(status_path(sweep, run))
    row: dict[str, Any] = {"index": run.index, "run": run.id, **run.labels}
    errors = [f"{n}: {rec['error']}" for n, rec in (status.get("stages") or {}).items()
              if rec.get("error")]  # fmt: skip
    row.update(dict.fromkeys(sweep.stages, "unknown"))  # until the folder says
    try:
        for name in sweep.stages:
            rec = (status.get("stages") or {}).get(name) or {}
            now = folder.status(name, run.config)
            kept = rec.get("status") == NOT_APPLICABLE or stage_failed(rec)
            row[name] = rec["status"] if kept else now
        train = folder.read_json(TRAIN_SUMMARY)
        final = train.get("final") or {}
        ratios = folder.measured_rows("memorization", run.config) or _ratios(
            folder.layers_at(run.config)
        )
        row.update(
            test_acc=final.get("test_acc"), train_acc=final.get("train_acc"),
            memorized=(train.get("label_noise") or {}).get("memorized"),
            epochs=train.get("epochs_done"), train_seconds=train.get("train_seconds"),
            memorization_layers=" ".join(map(str, memorization_layers(ratios))) if ratios
            else None, notes=" ".join(readability(run.config.to_dict(), train)) or None,
        )  # fmt: skip
    except NCLayersError as err:
        errors.append(str(err))
        damaged.append(f"run {run.index}: {err}")
    row.update(errors="; ".join(errors) or None, folder=str(run.folder))
    return row


def _probe_history(folder, cfg: Config) -> Table:
    """The probe's per-epoch history at the sweep's settings (the folder's latest
    probe.csv for a probe recorded before histories were kept per measurement)."""
    from nclayers.jobs.folder import PROBE, measurement_file

    record = folder.measurement("probe", cfg)
    latest = (folder.stages().get("probe") or {}).get("key")
    if record is None or record["key"] == latest:  # the folder's probe.csv is this one
        return folder.read_table(PROBE)
    name = measurement_file("probe", record["key"], "history")
    return folder.read_table(name if folder.exists(name) else PROBE)


def _columns_out(rows: Table, *names: str) -> Table:
    return Table({k: v for k, v in r.items() if k not in names} for r in rows)


def _ratios(rows: Table) -> Table:
    from nclayers.memorization import memorization_ratio

    if not any(r.get("view") == "noisy" for r in rows):
        return Table()
    try:
        return memorization_ratio(rows, split="train")
    except ValueError:
        return Table()


def _write_tables(out: Path, tables: dict[str, Table]) -> dict:
    from nclayers.jobs.folder import RunFolder

    folder, written = RunFolder(out), {}  # the sweep's folder: the same store as a run's
    for name, table in tables.items():
        if table or name == "runs":
            written[name] = str(folder.write_table(f"{name}.csv", table))
        else:
            folder.remove(f"{name}.csv")
    return written


def sweep_report(path: str | Path, out: str | Path | None = None) -> Path:
    """The report of a sweep file's output folder."""
    from nclayers.jobs.report import write_report

    return write_report(load_sweep(path).out, out)


def sweep_json(sweep: Sweep, summary: dict) -> dict:
    return {
        "name": sweep.name, "title": sweep.title, "description": sweep.description,
        "file": str(sweep.path), "overrides": sweep.overrides, "root": str(sweep.root),
        "axes": sweep.axes, "stages": sweep.stages, "figures": sweep.figures,
        "runs": [{"index": r.index, "id": r.id, "labels": r.labels, "settings": r.settings,
                  "folder": str(r.folder)} for r in sweep.runs],
        "summary": summary,
    }  # fmt: skip


def _read_status(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # a missing or torn status only means the stages run (or show) again
    return obj if isinstance(obj, dict) else {}


def describe(sweep: Sweep) -> str:
    """A short text of the grid: axes, stages, where runs and outputs go."""
    lines = [f"sweep {sweep.name}: {len(sweep.runs)} runs, stages {', '.join(sweep.stages)}"]
    lines += [f"  axis {a}: {', '.join(v)}" for a, v in sweep.axes.items()]
    lines.append(f"  runs in {sweep.root / 'runs'}/<id>, outputs in {sweep.out}/")
    return "\n".join(lines)


__all__ = ["Run", "Sweep", "collect", "commands", "describe", "load_sweep", "out_lock",
           "run_id", "run_one", "stage_jobs", "sweep_json"]  # fmt: skip
