"""`nclayers report RUN_OR_SWEEP`: one self-contained HTML file for a run or a sweep.

For a run folder: its data conditions, accuracies, timings, which stages are done and
which are out of date with respect to the weights, whether its figures can be read
(`readability`: a clean model well above chance, a noisy one that fits its changed
labels), the memorization layers, the figures (redrawn when their data is newer), the
per-layer table, every other table the run holds, its training history and its config.
For a sweep's output folder (it holds sweep.json): the sweep's figures, one row per run
(labels, stage status, accuracies, memorization layers, errors), the tidy tables and
each run's settings. Figures are inlined as base64; values are escaped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from nclayers.data.noise import has_label_noise
from nclayers.errors import NCLayersError
from nclayers.jobs.folder import (
    CONFIG,
    DYNAMICS,
    ERROR_LOG,
    LAYERS,
    MEMORIZATION,
    PROBE,
    PRUNE,
    REPORT,
    SUMMARY,
    TRAIN_SUMMARY,
    RunFolder,
)
from nclayers.jobs.stages import ORDER, STAGES
from nclayers.report.html import Figure, Section, render_html
from nclayers.table import COLUMNS, Table, shown_columns

LAYER_COLUMNS = ["run", "split", "view", "layer", "block", "dim", "n",
                 *(c for c in COLUMNS if c in {"cdnv_mean", *shown_columns()})]  # fmt: skip
RATIO_COLUMNS = ["run", "layer", "block", "nc1_clean", "nc1_noisy", "ratio", "memorizing"]
KNOWN_TABLES = {LAYERS, MEMORIZATION, DYNAMICS, "runs.csv"}
STAGE_ORDER = ORDER
# A figure can be read when a clean model is well above chance (this many times it) and
# a noisy one fits this share of its changed labels (Δ needs memorization to mean anything).
# The stage that draws each of a run's own figures (by file stem, before any "-SPLIT").
FIGURE_STAGES = {Path(s.figure).stem: s.name for s in STAGES if s.figure}
ABOVE_CHANCE = 3.0
FITS_NOISE = 0.9


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write report.html for a run folder or a sweep's output folder."""
    path = Path(path)
    if not path.is_dir():
        raise NCLayersError(f"report: {str(path)!r} is neither a run folder nor a sweep folder")
    if (path / "sweep.json").is_file():
        title, sections = _sweep_sections(path)
    elif any((path / f).is_file() for f in (LAYERS, TRAIN_SUMMARY, CONFIG)):
        title, sections = _run_sections(RunFolder(path))
    else:
        raise NCLayersError(
            f"report: {str(path)!r} holds no layers.csv, train_summary.json, config.yaml or "
            "sweep.json; pass a run folder (train/analyze --out) or a sweep's output folder"
        )
    html = render_html(title, sections, subtitle=f"nclayers report of {path}")
    if out is None:  # in the folder: through its store, like every file there
        return RunFolder(path).write(REPORT, html)
    from nclayers.files import atomic_write

    return atomic_write(Path(out), html)


# ----------------------------------------------------------------------------- readability
def readability(config: dict | None, train: dict) -> list[str]:
    """Why a run's figures cannot be read, in words (empty when they can): a clean model
    not well above chance, or a noisy model that did not fit its changed labels."""
    notes = []
    final = train.get("final") or {}
    data = (config or {}).get("data") or {}
    noise = train.get("label_noise") or {}
    if has_label_noise(data.get("noise")) and noise.get("memorized") is not None:
        if noise["memorized"] < FITS_NOISE:
            notes.append(
                f"Δ not interpretable: the model fits {noise['memorized']:.0%} of its changed "
                f"labels (Δ needs ≥ {FITS_NOISE:.0%}; train longer or on fewer images)"
            )
    elif final.get("test_acc") is not None and train.get("num_classes"):
        chance = 1.0 / train["num_classes"]
        if final["test_acc"] < ABOVE_CHANCE * chance:
            notes.append(
                f"NC curves of an undertrained model: test accuracy {final['test_acc']:.0%} "
                f"(chance {chance:.0%}); train longer before reading them"
            )
    return notes


# ----------------------------------------------------------------------------- a run
def _run_sections(folder: RunFolder) -> tuple[str, list[Section]]:
    summary, train = folder.read_json(SUMMARY), folder.read_json(TRAIN_SUMMARY)
    config = _config_dict(folder) or train.get("config") or {}
    layers = folder.layers()
    ratios = _ratios(folder, layers)
    name = config.get("run") or folder.path.name
    runs = list(dict.fromkeys(r.get("run") for r in layers))
    subruns = [p for p in sorted(folder.path.iterdir()) if (p / CONFIG).is_file()]
    if len(runs) > 1 and subruns:  # e.g. the demo: several runs, each in a subfolder
        overview = {"runs": ", ".join(map(str, runs)), **model_description(config)}
    else:
        overview = run_items(folder, config, summary, train)
    notes = readability(config, train) if not subruns else []
    warnings = fit_warnings(folder, layers)  # issue 24: underfit probes, a wrecked baseline
    sections = [Section("Overview", text=" ".join([*notes, *warnings]), items=overview)]
    if subruns:
        sections.append(Section("Each run", subsections=[_subrun(RunFolder(p)) for p in subruns]))
    if ratios:
        sections.append(memorization_section(ratios, notes))
    figures, left_out = run_figures(folder, layers, ratios, notes)
    if figures or left_out:
        sections.append(Section("Figures", text=" ".join(left_out), figures=figures))
    if layers:
        cols = [c for c in LAYER_COLUMNS if c in layers.columns]
        cols += [c for c in layers.columns if c not in cols]
        sections.append(Section("Per-layer table (layers.csv)", table=layers, columns=cols))
    sections += other_tables(folder)
    if train.get("history"):
        sections.append(Section("Training history", table=Table(train["history"]), collapsed=True))
    if folder.exists(CONFIG):
        sections.append(Section("Config (config.yaml)", code=folder.file(CONFIG).read_text(),
                                collapsed=True))  # fmt: skip
    return f"nclayers run {name}", sections


def fit_warnings(folder: RunFolder, layers: Table) -> list[str]:
    """The probe's underfit note (probe accuracy more than 2 points below NCC) and the
    prune fine-tune's flag (the unpruned model lost more than 2 points in it)."""
    from nclayers.probing import underfit_note
    from nclayers.prune import baseline_note

    out = []
    for run in dict.fromkeys(r.get("run") for r in layers):
        note = underfit_note(layers.where(split="test", run=run))
        if note:
            out.append(f"run {run}: {note}." if run else f"{note}.")
    if folder.exists(PRUNE):
        note = baseline_note(folder.read_table(PRUNE))
        if note:
            out.append(note)
    return out


def run_items(folder: RunFolder, config: dict, summary: dict, train: dict) -> dict[str, Any]:
    """The key facts of one run: data, model, accuracies, timings, stage status."""
    items = {**data_conditions(config), **model_description(config)}
    items.update(accuracies(summary, train))
    items.update(timings(summary, train, folder.stages()))
    items.update(stage_status(folder, config))
    return items


def stage_status(folder: RunFolder, config: dict) -> dict[str, str]:
    """Per recorded stage: "done" or "out of date: why" against the run's weights now."""
    from nclayers.config import Config

    try:
        cfg = Config.model_validate(config)
    except ValueError:
        return {}
    stages = folder.stages()
    return {f"stage {s}": folder.status(s, _recorded(cfg, stages[s]))
            for s in STAGE_ORDER if s in stages}  # fmt: skip


def _recorded(cfg, record: dict):
    """`cfg` with the settings a stage recorded: the report judges the measurement it
    shows (other weights since, damaged files), not settings the stage was not asked."""
    if not isinstance(record.get("settings"), dict):
        return cfg
    try:
        return cfg.updated(record["settings"])
    except (ValueError, NCLayersError):
        return cfg


def _subrun(folder: RunFolder) -> Section:
    summary, train = folder.read_json(SUMMARY), folder.read_json(TRAIN_SUMMARY)
    config = _config_dict(folder) or train.get("config") or {}
    items = {"folder": str(folder.path), **run_items(folder, config, summary, train)}
    notes = readability(config, train)
    return Section(f"run {config.get('run') or folder.path.name}", text=" ".join(notes),
                   items=items)  # fmt: skip


def run_figures(
    folder: RunFolder, layers: Table, ratios: Table, notes: list[str]
) -> tuple[list[Figure], list[str]]:
    """The run's figures, each drawn from the rows the report shows (or reused when a
    drawing of exactly those rows and settings is there: figures/<stem>-<hash>.png): the
    paper's layout, probe accuracy, Δ, the NC dynamics; and equality's and prune's own
    figures while their stage is up to date. Any other PNG in the folder is left out."""
    from nclayers.report.figures import plot_layout, plot_metric

    figs, left_out = [], []
    if layers:
        noisy = any(r.get("view") == "noisy" for r in layers)
        several = len({r.get("run") for r in layers}) > 1  # one curve per run
        settings = {"noisy": noisy, "several": several, "notes": notes}
        drawn = keyed_figure(folder, "layers", [layers, ratios if noisy else Table()], settings,
                             lambda path: plot_layout(
            layers, path.with_suffix(""), "noisy" if noisy else "clean",
            curves="run" if several else None, memorization=ratios if noisy else None,
            formats=("png",), notes=notes))  # fmt: skip
        if drawn:
            figs.append(Figure(drawn, "NC per block (the paper's layout)"))
    probed = Table(r for r in layers if r.get("probe_acc") is not None)
    if probed:
        drawn = keyed_figure(folder, "probe_acc", [probed], {}, lambda path: plot_metric(
            probed, "probe_acc", path, group=("run",)))  # fmt: skip
        figs += [Figure(drawn, "linear-probe accuracy per block")] if drawn else []
    if ratios:
        drawn = keyed_figure(folder, "memorization", [ratios], {}, lambda path: plot_metric(
            ratios, "ratio", path, group=("run",),
            title="memorization ratio Δ = NC1(clean) / NC1(noisy)"))  # fmt: skip
        figs += [Figure(drawn, "memorization ratio Δ per block")] if drawn else []
    if folder.exists(DYNAMICS):
        from nclayers.report.dynamics import plot_dynamics

        dynamics = folder.read_table(DYNAMICS)
        drawn = keyed_figure(folder, "nc_dynamics", [dynamics], {},
                             lambda path: plot_dynamics(dynamics, path))  # fmt: skip
        figs += [Figure(drawn, "NC per block during training")] if drawn else []
    own, left_out = _stage_figures(folder)
    return figs + own, left_out


def _stage_figures(folder: RunFolder) -> tuple[list[Figure], list[str]]:
    """equality's and prune's figures, while their stage is up to date (they are drawn
    from the stage's own tables, which the report shows too)."""
    figs, left_out = [], []
    status = stage_status(folder, _config_dict(folder))
    for p in sorted(folder.path.glob("*.png")):
        stage = FIGURE_STAGES.get(p.stem.split("-")[0])
        if stage not in ("equality", "prune") or status.get(f"stage {stage}") != "done":
            continue
        if _whole_png(p) and _as_written(folder, p.name):
            figs.append(Figure(p, p.name))
        else:
            left_out.append(f"{p} is damaged and left out; run `nclayers {stage} "
                            f"{folder.path}` again to redraw it.")  # fmt: skip
    return figs, left_out


def keyed_figure(
    folder: RunFolder, stem: str, tables: list[Table], settings: dict, plot
) -> Path | None:
    """figures/<stem>-<hash>.png, <hash> that of `tables` and `settings`: reused when it is
    there and whole, drawn otherwise (older drawings of `stem` removed). A figure is thus
    never shown beside numbers other than those it was drawn from."""
    text = "\n".join(t.to_csv_text() if t else "" for t in tables)
    text += json.dumps(settings, sort_keys=True, default=str)
    name = f"figures/{stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.png"
    path = folder.file(name)
    if not (path.is_file() and _whole_png(path) and _as_written(folder, name)):
        if folder.draw(name, plot) is None:
            return None
    old = [f"figures/{p.name}" for p in folder.file("figures").glob(f"{stem}-*.png")]
    folder.remove(*[o for o in old if o != name and len(o) == len(name)])
    return path


def _as_written(folder: RunFolder, name: str) -> bool:
    """Whether the file matches its checksum in manifest.json (or has none there)."""
    try:
        folder.verify(name)
    except NCLayersError:
        return False
    return True


def _whole_png(path: Path) -> bool:
    """A PNG with its signature and its end chunk (a cut or overwritten file is not)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(0, path.stat().st_size - 12))
            tail = f.read()
    except OSError:
        return False
    return head == b"\x89PNG\r\n\x1a\n" and tail[4:8] == b"IEND"


def memorization_section(ratios: Table, notes: list[str] = ()) -> Section:
    from nclayers.memorization import memorization_layers

    runs = list(dict.fromkeys(r.get("run") for r in ratios))
    text = [*notes]
    for run in runs:
        mine = ratios.where(run=run)
        who = f"run {run}: " if len(runs) > 1 else ""
        text.append(who + describe_memorization(mine, memorization_layers(mine)))
    cols = [c for c in RATIO_COLUMNS if c in ratios.columns]
    cols += [c for c in ratios.columns if c not in cols]
    return Section("Memorization layers", text=" ".join(text), table=ratios, columns=cols)


def describe_memorization(ratios: Table, layers: list[int]) -> str:
    """In words: which blocks memorize (Δ > 1), and the largest Δ."""
    if not ratios:
        return "no memorization ratio (no run with a noisy labels view)."
    top = max(ratios, key=lambda r: r["ratio"])
    n = len(ratios)
    if not layers:
        return (f"no block has Δ > 1 (largest Δ = {top['ratio']:.3g} at block {top['layer']} "
                f"of {n}): no memorization layer.")  # fmt: skip
    names = ", ".join(f"{r['layer']} ({r['block']})" for r in ratios if r["layer"] in layers)
    last = " — the last blocks" if layers[-1] == n else ""
    return (f"blocks {names} of {n} have Δ > 1{last}: there the training (noisy) labels are "
            f"more collapsed than the true ones; largest Δ = {top['ratio']:.3g} at block "
            f"{top['layer']}.")  # fmt: skip


def other_tables(folder: RunFolder) -> list[Section]:
    """Every other CSV of the folder (probe.csv, prune.csv, ...) as a section."""
    out = []
    for path in sorted(folder.path.glob("*.csv")):
        if path.name in KNOWN_TABLES:
            continue
        title = {PROBE: "Linear probes (probe.csv)", PRUNE: "Pruning (prune.csv)"}
        out.append(Section(title.get(path.name, path.name), table=folder.read_table(path.name),
                           collapsed=path.name not in title))  # fmt: skip
    return out


def data_conditions(config: dict | None) -> dict[str, Any]:
    data = (config or {}).get("data") or {}
    out: dict[str, Any] = {"data set": data.get("name")}
    noise = data.get("noise")
    if has_label_noise(noise):
        shuffled = isinstance(noise, (int, float))
        how = "shuffled" if data.get("noise_mode", "shuffle") == "shuffle" else "changed"
        out["label noise"] = (
            f"{float(noise):.0%} of the training labels {how}" if shuffled else f"CIFAR-N {noise}"
        )
        out["noise seed"] = data.get("noise_seed")
    else:
        out["label noise"] = "none (clean labels)"
    for key in ("corruption", "severity"):
        if data.get(key) not in (None, ""):
            out[key] = data[key]
    if data.get("train_subset") or data.get("test_subset"):
        out["subsets (train / test)"] = f"{data.get('train_subset')} / {data.get('test_subset')}"
    train = (config or {}).get("train") or {}
    if train:
        out["augmentation"] = train.get("augment")
    return out


def model_description(config: dict | None) -> dict[str, Any]:
    model = (config or {}).get("model") or {}
    train = (config or {}).get("train") or {}
    out = {"model": model.get("name")}
    if model.get("width"):
        out["width"] = model["width"]
    if model.get("checkpoint"):
        out["weights"] = model["checkpoint"]
    if train:
        out["recipe"] = (
            f"{train.get('optimizer')} lr {train.get('lr')} ({train.get('schedule')}), "
            f"{train.get('epochs')} epochs, batch {train.get('batch_size')}, weight decay "
            f"{train.get('weight_decay')}"
        )
    return out


def accuracies(summary: dict, train: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    final = train.get("final") or {}
    if final:
        out["final test accuracy"] = final.get("test_acc")
        view = train.get("train_labels", "clean")
        out[f"final train accuracy ({view} labels)"] = final.get("train_acc")
    noise = train.get("label_noise") or {}
    if noise.get("memorized") is not None:
        out["changed labels fitted (memorized)"] = noise["memorized"]
    for split, views in ((summary.get("analyze") or {}).get("accuracy") or {}).items():
        for view, acc in (views or {}).items():
            out[f"accuracy, {split} split, {view} labels"] = acc
    return out


def timings(summary: dict, train: dict, stages: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if train.get("train_seconds") is not None:
        out["training time"] = f"{train['train_seconds']:.1f} s"
    for split, s in ((summary.get("analyze") or {}).get("seconds") or {}).items():
        out[f"analysis time ({split})"] = f"{s:.1f} s"
    for name, info in (stages or {}).items():
        if isinstance(info, dict) and info.get("seconds") is not None:
            out[f"time of stage {name}"] = f"{info['seconds']:.1f} s"
    device = (summary.get("analyze") or {}).get("device") or train.get("device")
    if device:
        out["device"] = device
    return out


# ----------------------------------------------------------------------------- a sweep
def _sweep_sections(out: Path) -> tuple[str, list[Section]]:
    info = _json(out / "sweep.json")
    summary = info.get("summary") or {}
    runs, layers, ratios = (_table(out / n) for n in ("runs.csv", LAYERS, MEMORIZATION))
    overview = {
        "sweep file": info.get("file"),
        "overrides": " ".join(info.get("overrides") or []) or None,
        "axes": "; ".join(
            f"{a}: {', '.join(map(str, v))}" for a, v in info.get("axes", {}).items()
        ),
        "stages": ", ".join(info.get("stages", [])),
        "runs": len(info.get("runs", [])),
        "stage status": ", ".join(f"{k}: {v}" for k, v in (summary.get("stages") or {}).items()),
        "run folders": str(Path(info.get("root", "")) / "runs"),
    }
    if summary.get("seconds") is not None:
        overview["sweep time (this invocation)"] = f"{summary['seconds']:.1f} s"
    notes = [f"run {r['index']}: {r['notes']}" for r in runs if r.get("notes")]
    text = " ".join([info.get("description", ""), *notes]).strip()
    sections = [Section("Overview", text=text, items=overview)]
    figures = [Figure(p, p.name) for p in _sweep_pngs(out, info)]
    errors = summary.get("figure_errors") or []
    if figures or errors:
        sections.append(Section("Figures", text=" ".join(errors), figures=figures))
    if runs:
        sections.append(Section("Runs", table=runs))
    if ratios:
        sections.append(memorization_section(ratios))
    if layers:
        sections.append(Section("Per-layer table (layers.csv)", table=layers, collapsed=True))
    sections += other_tables(RunFolder(out))
    details = [_sweep_run(r) for r in info.get("runs", [])]
    if details:
        sections.append(Section("Each run", subsections=details))
    sweep_file = Path(info.get("file", ""))
    if sweep_file.is_file():
        sections.append(Section(f"Sweep file ({sweep_file.name})", code=sweep_file.read_text(),
                                collapsed=True))  # fmt: skip
    return str(info.get("title") or f"nclayers sweep {out.name}"), sections


def _sweep_run(r: dict) -> Section:
    folder = RunFolder(r["folder"])
    title = f"run {r['index']}: " + ", ".join(f"{k}={v}" for k, v in r.get("labels", {}).items())
    try:
        summary, train = folder.read_json(SUMMARY), folder.read_json(TRAIN_SUMMARY)
        config = _config_dict(folder) or {}
        items = {"id": r["id"], "folder": str(folder.path), **r.get("labels", {}),
                 **run_items(folder, config, summary, train)}  # fmt: skip
    except NCLayersError as err:  # a damaged run costs its own section, not the report
        items = {"id": r["id"], "folder": str(folder.path), "error": str(err)}
    err_log = folder.file(ERROR_LOG)
    code = err_log.read_text(errors="replace")[-4000:] if err_log.is_file() else ""
    return Section(title, items=items, code=code, collapsed=True)


def _sweep_pngs(out: Path, info: dict) -> list[Path]:
    files = (info.get("summary") or {}).get("files", {}).get("figures", [])
    pngs = [Path(f) for f in files if str(f).endswith(".png") and _whole_png(Path(f))]
    return pngs or sorted(p for p in out.glob("*.png") if _whole_png(p))


# ----------------------------------------------------------------------------- figures
def draw_figures(
    figures: list[dict], out: Path, layers: Table, memo: Table, title: str, name: str,
    notes: list[str] = (), mathtext: bool = False,
) -> list[Path]:  # fmt: skip
    from nclayers.report.figures import Panel, plot_layout

    if not layers:
        return []
    paths = []
    for i, fig in enumerate(figures):
        layout = fig.get("layout", "clean")
        if "panels" in fig:
            layout = tuple(Panel(m) for m in fig["panels"])
        stem = fig.get("name") or (name if len(figures) == 1 else f"{name}-{i + 1}")
        paths += RunFolder(out).draw_all(lambda tmp, fig=fig, layout=layout, stem=stem: plot_layout(
            layers, tmp / stem, layout, rows=fig.get("rows"), curves=fig.get("curves"),
            x=fig.get("x", "block"), memorization=memo, title=fig.get("title") or title,
            notes=notes, mathtext=mathtext,
        ))  # fmt: skip
    return paths


def plot_paths(
    path: str | Path,
    layout: str | None = None,
    rows: str | None = None,
    curves: str | None = None,
    x: str = "block",
    out: str | Path | None = None,
) -> list[Path]:
    """The paper's layouts from a sweep's folder (its figure settings, or these) or from a
    tidy CSV (layout, rows and curves given here)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    layers = _table(folder / LAYERS if path.is_dir() else path)
    if not layers:
        raise NCLayersError(f"plot: no rows in {str(folder / 'layers.csv')!r}; run the sweep first")
    memo = _table(folder / MEMORIZATION)
    info = _json(folder / "sweep.json")
    figures = info.get("figures") or []
    if layout or rows or curves or not figures:
        figures = [{"layout": layout or "clean", "rows": rows, "curves": curves, "x": x,
                    "name": layout or "layout"}]  # fmt: skip
    return draw_figures(figures, Path(out) if out else folder, layers, memo or None,
                        info.get("title", ""), info.get("name", "layout"))  # fmt: skip


def plot_csv(
    csv: str | Path, out: str | Path | None = None, split: str | None = None,
    metrics: list[str] | None = None,
) -> list[Path]:  # fmt: skip
    """`nclayers plot FILE.csv`: a layers.csv's per-block metrics (or nc_dynamics.csv's
    curves), written beside it (or into `out`) through the folder's store. The report
    never embeds them: it draws its own figures from the rows it shows."""
    from nclayers.report.figures import plot_layers, plot_metric

    table = Table.from_csv(csv)
    folder = RunFolder(Path(out) if out else Path(csv).parent)
    if split:
        table = table.where(split=split)
    if any(r.get("epoch") is not None for r in table):  # train's nc_dynamics.csv
        from nclayers.report.dynamics import plot_dynamics

        chosen = tuple(metrics or ("nc1", "nc2"))
        return folder.draw_all(lambda tmp: plot_dynamics(table, tmp / f"{Path(csv).stem}.png",
                                                         chosen))  # fmt: skip
    if metrics:
        return folder.draw_all(lambda tmp: [plot_metric(table, m, tmp / f"{m}.png")
                                            for m in metrics])  # fmt: skip
    return folder.draw_all(lambda tmp: plot_layers(table, tmp))


# ----------------------------------------------------------------------------- files
def _ratios(folder: RunFolder, layers: Table) -> Table:
    ratios = folder.read_table(MEMORIZATION)
    if ratios or not any(r.get("view") == "noisy" for r in layers):
        return ratios
    from nclayers.memorization import memorization_ratio

    try:
        return memorization_ratio(layers, split="train")
    except ValueError:
        return Table()


def _config_dict(folder: RunFolder) -> dict:
    return folder.config().to_dict() if folder.exists(CONFIG) else {}


def _table(path: Path) -> Table:
    return Table.from_csv(path) if Path(path).is_file() else Table()


def _json(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NCLayersError(f"{path} is damaged (not valid JSON: {err}); delete it and run "
                            "the sweep again (finished runs are kept)") from None  # fmt: skip
    return obj if isinstance(obj, dict) else {}
