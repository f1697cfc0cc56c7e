"""`nclayers sweep FILE`: a grid of runs, their stages, one tidy table, figures and a report.

A sweep file (YAML) holds

    name: fig3-cpu-mini            # default: the file's stem
    title: "..."                   # shown on the figure and the report
    root: runs/paper               # run folders: ROOT/runs/<id>; outputs: ROOT/<name>/
    base: ../resnet18-cifar10.yaml # optional config file (relative to this file) or mapping
    config: {train.epochs: 30}     # settings on top of base (nested or dotted keys)
    axes:                          # the grid: the product of every axis, in file order
      model:                       # a value is a mapping of settings with a label ...
        - {label: ResNet18, model.name: resnet18}
      train.seed: [0, 1, 2]        # ... or a plain value of the config key named by the axis
    stages: [train, analyze, probe]
    figures:                       # or `figure:` with one mapping
      - {layout: noisy, rows: model, curves: noise, x: block}
    report: true

Every run's config is resolved (defaults <- base <- config <- command-line overrides <-
its axis values) and type-checked up front, so `--print` validates the whole file. A run
lives in ROOT/runs/<id>, where <id> is a short hash of its resolved config (without the
keys that do not change its results: out, run, device, data.dir, checkpoint cadence,
TensorBoard), so two sweeps that contain the same run share its folder and its work.

Running a sweep runs every unfinished stage of every run and skips finished ones; an
interrupted training resumes from its checkpoint. A failing stage is recorded (status
and traceback) and the sweep goes on with the next run. Then the runs' tables are
gathered into tidy CSVs (one row per run, split, view and block, with a column per axis),
the figures are drawn and the report written, all in ROOT/<name>/.

Stages come from a registry (`STAGES`): a stage whose job has not landed in this
nclayers is reported as such when a run reaches it, not as a crash.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nclayers.config import Config, apply_settings, load_config
from nclayers.data.noise import has_label_noise
from nclayers.errors import NCLayersError
from nclayers.table import Table

SWEEP_KEYS = ("name", "title", "root", "base", "config", "axes", "stages", "figure", "figures",
              "report", "description")  # fmt: skip
FIGURE_KEYS = ("layout", "panels", "rows", "curves", "x", "name", "title")
# Config keys that do not change a run's results: left out of its id.
UNHASHED = ("out", "run", "device", "data.dir", "data.download", "train.checkpoint_every",
            "train.tensorboard")  # fmt: skip
ID_LENGTH = 12


# ----------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class Stage:
    """A job a run may need. `target` is "module:function"; `call` adapts the sweep's
    arguments (config, run folder, resume, progress) to the job's signature."""

    name: str
    target: str
    needs: tuple[str, ...] = ()
    call: Callable[..., Any] | None = None
    lands_with: str = ""  # where the job comes from when it is not there yet

    def load(self) -> Callable:
        module, _, function = self.target.partition(":")
        try:
            fn = getattr(importlib.import_module(module), function, None)
        except ModuleNotFoundError as err:
            if err.name and module.startswith(err.name):
                fn = None
            else:
                raise
        if fn is None:
            raise StageUnavailable(
                f"stage {self.name!r} is not available in this nclayers: {self.target} is "
                f"missing{' (it lands with ' + self.lands_with + ')' if self.lands_with else ''}"
                f"; drop {self.name!r} from the sweep's stages or update nclayers, then rerun "
                "the sweep: finished stages are skipped"
            )
        return fn


class StageUnavailable(RuntimeError):
    pass


def _call_train(fn, cfg: Config, folder: Path, progress: bool):
    from nclayers.jobs.folder import CHECKPOINT

    # An interrupted training continues from its checkpoint.
    return fn(cfg, resume=(folder / CHECKPOINT).is_file(), progress=progress)


def _call_plain(fn, cfg: Config, folder: Path, progress: bool):
    return fn(cfg, progress=progress)


def _call_folder(fn, cfg: Config, folder: Path, progress: bool):
    # Jobs that read their config back from the run folder (e.g. memorization).
    return fn(folder, progress=progress)


def _call_target(fn, cfg: Config, folder: Path, progress: bool):
    # Jobs that take the folder to read and the settings (e.g. equality).
    return fn(folder, cfg)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("train", "nclayers.jobs.train:train_run", call=_call_train),
        Stage("analyze", "nclayers.jobs.analyze:analyze_run", ("train",), _call_plain),
        Stage("probe", "nclayers.jobs.probe:probe_run", ("train",), _call_plain,
              "the probe issue"),
        Stage("memorization", "nclayers.jobs.memorization:memorization_run", ("train",),
              _call_folder, "the corruption issue"),
        Stage("prune", "nclayers.jobs.prune:prune_run", ("train",), _call_plain,
              "the equality issue"),
        Stage("equality", "nclayers.jobs.equality:equality_run", ("analyze",), _call_target,
              "the equality issue"),
    )
}  # fmt: skip


def stage_available(name: str) -> bool:
    try:
        STAGES[name].load()
    except StageUnavailable:
        return False
    return True


# ----------------------------------------------------------------------------- the file
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

    @property
    def out(self) -> Path:
        return self.root / self.name


def run_id(cfg: Config) -> str:
    """A short hash of the settings that define a run's results: those that differ from
    the defaults, so a config key added to nclayers later (at its default) leaves every
    existing run's id, and folder, as it was."""
    defaults = _flatten(Config().to_dict())
    flat = _flatten(cfg.to_dict())
    if not has_label_noise(flat.get("data.noise")):  # every spelling of clean labels alike
        flat["data.noise"] = defaults["data.noise"]
    kept = {
        k: v
        for k, v in flat.items()
        if k not in UNHASHED and (k not in defaults or v != defaults[k])
    }
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:ID_LENGTH]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix + k).endswith("options"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _axis_values(axis: str, values: Any, where: str) -> list[tuple[str, dict]]:
    if not isinstance(values, list) or not values:
        raise NCLayersError(f"{where}: axis {axis!r} needs a non-empty list of values")
    out = []
    for value in values:
        if isinstance(value, dict):
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


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read and check a sweep file; every run's config is resolved and validated."""
    path = Path(path)
    if not path.is_file():
        raise NCLayersError(f"sweep file {str(path)!r} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    where = str(path)
    if not isinstance(spec, dict):
        raise NCLayersError(f"{where}: expected a mapping at the top level")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise NCLayersError(f"{where}: unknown keys {unknown}; valid keys: {', '.join(SWEEP_KEYS)}")

    base_path, base_settings = None, {}
    if isinstance(spec.get("base"), dict):  # the base config written out here
        base_settings = spec["base"]
    elif spec.get("base"):  # a config file, relative to the sweep file
        base_path = (path.parent / str(spec["base"])).resolve()
        if not base_path.is_file():
            raise NCLayersError(f"{where}: base {spec['base']!r} does not exist ({base_path})")
    axes_spec = spec.get("axes") or {}
    if not isinstance(axes_spec, dict):
        raise NCLayersError(f"{where}: axes must map an axis name to its values")
    axes = {a: _axis_values(a, v, where) for a, v in axes_spec.items()}

    stages = spec.get("stages", ["train", "analyze"])
    if not isinstance(stages, list) or not stages:
        raise NCLayersError(f"{where}: stages must be a non-empty list, e.g. [train, analyze]")
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise NCLayersError(f"{where}: unknown stages {bad}; known stages: {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in stages]  # the registry's order: train first

    figures = spec.get("figures", [spec["figure"]] if spec.get("figure") else [])
    figures = [_check_figure(f, axes, where) for f in figures]

    def resolved(settings: dict) -> Config:
        cfg = load_config(base_path, [])
        apply_settings(cfg, base_settings, f"{where}: base")
        apply_settings(cfg, spec.get("config") or {}, f"{where}: config")
        load_config(None, list(overrides), base=cfg)
        return apply_settings(cfg, settings, f"{where}: axes")

    name = str(spec.get("name") or path.stem)
    root = Path(spec.get("root") or "runs/sweeps")
    runs = []
    for index, combo in enumerate(itertools.product(*axes.values())):
        labels = {a: lab for a, (lab, _) in zip(axes, combo, strict=True)}
        settings = {k: v for _, s in combo for k, v in s.items()}
        cfg = resolved(settings)
        rid = run_id(cfg)
        folder = root / "runs" / rid
        cfg.out, cfg.run = str(folder), rid
        runs.append(Run(index, labels, settings, cfg, rid, folder))
    if not runs:  # no axes: one run
        cfg = resolved({})
        rid = run_id(cfg)
        cfg.out, cfg.run = str(root / "runs" / rid), rid
        runs.append(Run(0, {}, {}, cfg, rid, root / "runs" / rid))
    seen: dict[str, int] = {}
    for r in runs:
        if r.id in seen:
            raise NCLayersError(
                f"{where}: runs {seen[r.id]} and {r.index} resolve to the same config "
                f"({r.labels} vs {runs[seen[r.id]].labels}); an axis value changes nothing"
            )
        seen[r.id] = r.index
    return Sweep(
        name=name, title=str(spec.get("title") or name), path=path, root=root,
        axes={a: [lab for lab, _ in v] for a, v in axes.items()}, stages=stages,
        figures=figures, report=bool(spec.get("report", True)), runs=runs,
        overrides=list(overrides), description=str(spec.get("description") or ""),
    )  # fmt: skip


def _check_figure(fig: Any, axes: dict, where: str) -> dict:
    from nclayers.report.figures import LAYOUTS, X_AXES

    if not isinstance(fig, dict):
        raise NCLayersError(f"{where}: a figure is a mapping, e.g. {{layout: noisy, rows: model}}")
    unknown = sorted(set(fig) - set(FIGURE_KEYS))
    if unknown:
        raise NCLayersError(f"{where}: figure keys {unknown} unknown; valid: {FIGURE_KEYS}")
    fig = dict(fig)
    if "panels" in fig:
        if not isinstance(fig["panels"], list) or not fig["panels"]:
            raise NCLayersError(f"{where}: figure panels must list metrics, e.g. [cdnv_mean, nc2]")
    else:
        fig.setdefault("layout", "clean")
        if fig["layout"] not in LAYOUTS:
            raise NCLayersError(
                f"{where}: figure layout {fig['layout']!r}; one of {sorted(LAYOUTS)}"
            )
    for key in ("rows", "curves"):
        if fig.get(key) is not None and fig[key] not in axes:
            raise NCLayersError(
                f"{where}: figure {key}={fig[key]!r} is not an axis; axes are {list(axes)}"
            )
    if fig.setdefault("x", "block") not in X_AXES:
        raise NCLayersError(f"{where}: figure x={fig['x']!r}; one of {sorted(X_AXES)}")
    return fig


# ----------------------------------------------------------------------------- running
def commands(sweep: Sweep) -> list[str]:
    """One shell command per run, for a cluster scheduler (e.g. a Slurm job array)."""
    base = ["nclayers", "sweep", str(sweep.path), *sweep.overrides]
    return [shlex.join([*base, "--index", str(r.index)]) for r in sweep.runs]


def _status_path(sweep: Sweep, run: Run) -> Path:
    return sweep.out / "status" / f"{run.index:04d}-{run.id}.json"


def run_one(sweep: Sweep, index: int, progress: bool = True) -> dict:
    """Run every unfinished stage of run `index`; never raises for a failing stage:
    the failure (and its traceback, in the run folder's error.log) is recorded."""
    from nclayers.jobs.folder import RunFolder

    if not 0 <= index < len(sweep.runs):
        raise NCLayersError(f"--index {index}: the sweep has runs 0..{len(sweep.runs) - 1}")
    run = sweep.runs[index]
    run.folder.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(run.folder)
    status = {"index": run.index, "id": run.id, "labels": run.labels,
              "folder": str(run.folder), "stages": {}}  # fmt: skip
    failed: set[str] = set()
    for name in sweep.stages:
        stage = STAGES[name]
        record: dict[str, Any] = {}
        blocked = [n for n in stage.needs if n in failed]
        if blocked:
            record = {"status": "blocked", "error": f"needs {blocked}, which failed"}
            failed.add(name)
        elif folder.done(name):
            record = {"status": "done", "skipped": True}
        else:
            t0 = time.perf_counter()
            try:
                fn = stage.load()
                (stage.call or _call_plain)(fn, run.config, run.folder, progress)
                if not folder.done(name):  # jobs mark themselves; this covers any that don't
                    folder.mark_done(name, seconds=time.perf_counter() - t0)
                record = {"status": "done", "seconds": time.perf_counter() - t0}
            except Exception as err:  # recorded; the sweep goes on with the next run
                failed.add(name)
                record = {"status": "failed", "seconds": time.perf_counter() - t0,
                          "error": f"{type(err).__name__}: {err}"}  # fmt: skip
                with open(run.folder / "error.log", "a") as log:
                    log.write(f"--- stage {name}, {time.ctime()}\n{traceback.format_exc()}\n")
        if progress or record["status"] != "done":
            state = "skipped (finished before)" if record.get("skipped") else record["status"]
            why = f": {record['error']}" if "error" in record else ""
            where = f"[sweep {sweep.name}] run {run.index} ({_describe(run)})"
            print(f"{where}: {name} {state}{why}", file=sys.stderr)
        status["stages"][name] = record
    path = _status_path(sweep, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(status, indent=2))
    return status


def _describe(run: Run) -> str:
    return ", ".join(f"{a}={lab}" for a, lab in run.labels.items()) or run.id


def run_sweep(
    sweep: Sweep,
    gpus: list[str] | None = None,
    progress: bool = True,
    collect_only: bool = False,
) -> dict:
    """Run the whole sweep (in this process, or one subprocess per GPU), then gather,
    plot and report. Returns the gathered summary."""
    t0 = time.perf_counter()
    sweep.out.mkdir(parents=True, exist_ok=True)
    if not collect_only:
        if gpus:
            _run_on_gpus(sweep, gpus, progress)
        else:
            for run in sweep.runs:
                run_one(sweep, run.index, progress)
    summary = collect(sweep)
    summary["seconds"] = time.perf_counter() - t0
    (sweep.out / "sweep.json").write_text(json.dumps(_sweep_json(sweep, summary), indent=2))
    if sweep.report:
        from nclayers.jobs.report import write_report

        summary["report"] = str(write_report(sweep.out))
    return summary


def _run_on_gpus(sweep: Sweep, gpus: list[str], progress: bool) -> None:
    """One subprocess per run, one run per GPU at a time (CUDA_VISIBLE_DEVICES)."""
    pending = list(sweep.runs)
    busy: dict[str, tuple[subprocess.Popen, Run, Any]] = {}
    logs = sweep.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "nclayers.cli", "sweep", str(sweep.path), *sweep.overrides,
            "device=cuda", "-q"]  # fmt: skip
    while pending or busy:
        for gpu in gpus:
            if gpu not in busy and pending:
                run = pending.pop(0)
                log = open(logs / f"{run.index:04d}-{run.id}.log", "w")
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
                proc = subprocess.Popen([*base, "--index", str(run.index)], env=env,
                                        stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
                busy[gpu] = (proc, run, log)
                print(f"[sweep {sweep.name}] run {run.index} ({_describe(run)}) on GPU {gpu}")
        for gpu, (proc, run, log) in list(busy.items()):
            if proc.poll() is None:
                continue
            log.close()
            del busy[gpu]
            if proc.returncode != 0 and not _status_path(sweep, run).is_file():
                # The child died before recording anything (e.g. killed): record it here.
                status = {"index": run.index, "id": run.id, "labels": run.labels,
                          "folder": str(run.folder), "stages": {s: {
                              "status": "failed",
                              "error": f"process exited with {proc.returncode}; see {log.name}"}
                              for s in sweep.stages}}  # fmt: skip
                _status_path(sweep, run).parent.mkdir(parents=True, exist_ok=True)
                _status_path(sweep, run).write_text(json.dumps(status, indent=2))
            print(f"[sweep {sweep.name}] run {run.index} finished (exit {proc.returncode})")
        time.sleep(0.5)


# ----------------------------------------------------------------------------- gathering
def collect(sweep: Sweep) -> dict:
    """Gather every run's tables into ROOT/<name>/: layers.csv, memorization.csv,
    probe.csv (when any run has one), runs.csv; then draw the figures."""
    from nclayers.jobs.folder import MEMORIZATION, PROBE, TRAIN_SUMMARY, RunFolder
    from nclayers.memorization import memorization_layers, memorization_ratio

    out = sweep.out
    out.mkdir(parents=True, exist_ok=True)
    layers, memo, probe, runs = Table(), Table(), Table(), Table()
    for run in sweep.runs:
        folder = RunFolder(run.folder)
        tag = {"run": run.id, **run.labels}
        status = _read_json(_status_path(sweep, run))
        row: dict[str, Any] = {"index": run.index, **tag}
        for name in sweep.stages:
            rec = (status.get("stages") or {}).get(name) or {}
            row[name] = rec.get("status") or ("done" if folder.done(name) else "pending")
        rows = folder.layers()
        layers.extend({**r, **tag} for r in rows)
        ratios = _table(folder.file(MEMORIZATION))
        if not ratios and rows:
            try:
                ratios = memorization_ratio(rows, split="train")
            except ValueError:  # a clean run: no noisy view
                ratios = Table()
        memo.extend({**r, **tag} for r in ratios)
        probe.extend({**r, **tag} for r in _table(folder.file(PROBE)))
        train = folder.read_json(TRAIN_SUMMARY)
        final = train.get("final") or {}
        row.update(
            test_acc=final.get("test_acc"), train_acc=final.get("train_acc"),
            epochs=train.get("epochs_done"), train_seconds=train.get("train_seconds"),
            memorization_layers=" ".join(map(str, memorization_layers(ratios))) if ratios else None,
            errors="; ".join(f"{n}: {rec.get('error')}" for n, rec in
                             (status.get("stages") or {}).items() if rec.get("error")) or None,
            folder=str(run.folder),
        )  # fmt: skip
        runs.append(row)
    runs.to_csv(out / "runs.csv")
    written = {"runs": str(out / "runs.csv")}
    for name, table in (("layers", layers), ("memorization", memo), ("probe", probe)):
        path = out / f"{name}.csv"
        if table:
            table.to_csv(path)
            written[name] = str(path)
        else:
            path.unlink(missing_ok=True)
    from nclayers.jobs.report import draw_figures

    written["figures"] = [str(p) for p in draw_figures(sweep.figures, out, layers, memo,
                                                       sweep.title, sweep.name)]  # fmt: skip
    counts: dict[str, int] = {}
    for r in runs:
        for name in sweep.stages:
            counts[f"{name} {r[name]}"] = counts.get(f"{name} {r[name]}", 0) + 1
    return {"files": written, "stages": counts, "runs": len(runs)}


def sweep_report(path: str | Path, out: str | Path | None = None) -> Path:
    """The report of a sweep file's output folder."""
    from nclayers.jobs.report import write_report

    return write_report(load_sweep(path).out, out)


def _sweep_json(sweep: Sweep, summary: dict) -> dict:
    return {
        "name": sweep.name, "title": sweep.title, "description": sweep.description,
        "file": str(sweep.path), "overrides": sweep.overrides, "root": str(sweep.root),
        "axes": sweep.axes, "stages": sweep.stages, "figures": sweep.figures,
        "runs": [{"index": r.index, "id": r.id, "labels": r.labels, "settings": r.settings,
                  "folder": str(r.folder)} for r in sweep.runs],
        "summary": summary,
    }  # fmt: skip


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _table(path: Path) -> Table:
    return Table.from_csv(path) if Path(path).is_file() else Table()


def describe(sweep: Sweep) -> str:
    """A short text of the grid: axes, stages, where runs and outputs go."""
    lines = [f"sweep {sweep.name}: {len(sweep.runs)} runs, stages {', '.join(sweep.stages)}"]
    lines += [f"  axis {a}: {', '.join(v)}" for a, v in sweep.axes.items()]
    lines.append(f"  runs in {sweep.root / 'runs'}/<id>, outputs in {sweep.out}/")
    missing = [s for s in sweep.stages if not stage_available(s)]
    if missing:
        lines.append(f"  not yet available in this nclayers: {', '.join(missing)}")
    return "\n".join(lines)


__all__ = ["STAGES", "Run", "Stage", "Sweep", "collect", "commands", "load_sweep", "run_id",
           "run_one", "run_sweep"]  # fmt: skip
