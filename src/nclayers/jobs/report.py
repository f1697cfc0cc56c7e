"""`nclayers report RUN_OR_SWEEP`: one self-contained HTML file for a run or a sweep.

For a run folder: its data conditions, accuracies, timings, memorization layers, the
figures (drawn into FOLDER/figures/ when missing), the per-layer table, every other
table the run holds (probe.csv, memorization.csv, prune.csv, ...), its training history
and its config. For a sweep's output folder (it holds sweep.json): the sweep's figures,
one row per run (labels, stage status, accuracies, memorization layers, errors), the
tidy tables and each run's settings. Figures are inlined as base64; values are escaped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nclayers.data.noise import has_label_noise
from nclayers.errors import NCLayersError
from nclayers.jobs.folder import (
    CONFIG,
    DYNAMICS,
    LAYERS,
    MEMORIZATION,
    PROBE,
    PRUNE,
    REPORT,
    STAGES,
    SUMMARY,
    TRAIN_SUMMARY,
)
from nclayers.report.html import Figure, Section, render_html
from nclayers.table import Table

LAYER_COLUMNS = ["run", "split", "view", "layer", "block", "dim", "n", "nc1", "cdnv_mean",
                 "nc2", "ncc_acc", "probe_acc"]  # fmt: skip
RATIO_COLUMNS = ["run", "layer", "block", "nc1_clean", "nc1_noisy", "ratio", "memorizing"]
KNOWN_TABLES = {LAYERS, MEMORIZATION, DYNAMICS, "runs.csv"}


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write report.html for a run folder or a sweep's output folder (for a sweep file:
    `nclayers.jobs.sweep.sweep_report`)."""
    path = Path(path)
    if not path.is_dir():
        raise NCLayersError(f"report: {str(path)!r} is neither a run folder nor a sweep folder")
    if (path / "sweep.json").is_file():
        title, sections = _sweep_sections(path)
    elif any((path / f).is_file() for f in (LAYERS, TRAIN_SUMMARY, CONFIG)):
        title, sections = _run_sections(path)
    else:
        raise NCLayersError(
            f"report: {str(path)!r} holds no layers.csv, train_summary.json, config.yaml or "
            "sweep.json; pass a run folder (train/analyze --out) or a sweep's output folder"
        )
    target = Path(out) if out else path / REPORT
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_html(title, sections, subtitle=f"nclayers report of {path}"))
    return target


# ----------------------------------------------------------------------------- a run
def _run_sections(folder: Path) -> tuple[str, list[Section]]:
    summary = _json(folder / SUMMARY)
    train = _json(folder / TRAIN_SUMMARY)
    config = summary.get("config") or train.get("config") or _yaml(folder / CONFIG)
    layers = _table(folder / LAYERS)
    ratios = _ratios(folder, layers)
    name = (config or {}).get("run") or folder.name

    runs = list(dict.fromkeys(r.get("run") for r in layers))
    subruns = [p for p in sorted(folder.iterdir()) if (p / CONFIG).is_file()]
    if len(runs) > 1:  # e.g. the demo: several runs' tables, each run in a subfolder
        overview = {"runs": ", ".join(map(str, runs)), **model_description(config)}
        if summary.get("seconds") is not None and not isinstance(summary["seconds"], dict):
            overview["total time"] = f"{summary['seconds']:.1f} s"
    else:
        overview = {**data_conditions(config), **model_description(config)}
        overview.update(accuracies(summary, train, layers))
        overview.update(timings(summary, train, _json(folder / STAGES)))
    sections = [Section("Overview", items=overview)]
    if subruns:
        sections.append(Section("Each run", subsections=[_subrun(p) for p in subruns]))
    if ratios:
        sections.append(memorization_section(ratios))
    figures = run_figures(folder, layers, ratios)
    if figures:
        sections.append(Section("Figures", figures=figures))
    if layers:
        cols = [c for c in LAYER_COLUMNS if c in layers.columns]
        cols += [c for c in layers.columns if c not in cols]
        sections.append(Section("Per-layer table (layers.csv)", table=layers, columns=cols))
    sections += other_tables(folder)
    history = train.get("history")
    if history:
        sections.append(Section("Training history", table=Table(history), collapsed=True))
    if (folder / CONFIG).is_file():
        sections.append(Section("Config (config.yaml)", code=(folder / CONFIG).read_text(),
                                collapsed=True))  # fmt: skip
    return f"nclayers run {name}", sections


def _subrun(folder: Path) -> Section:
    summary, train = _json(folder / SUMMARY), _json(folder / TRAIN_SUMMARY)
    config = summary.get("config") or train.get("config") or _yaml(folder / CONFIG)
    items = {"folder": str(folder), **data_conditions(config), **model_description(config)}
    items.update(accuracies(summary, train, Table()))
    items.update(timings(summary, train, _json(folder / STAGES)))
    return Section(f"run {config.get('run') or folder.name}", items=items)


def run_figures(folder: Path, layers: Table, ratios: Table) -> list[Figure]:
    """The run's PNG figures; the paper's layout is drawn into figures/ when missing."""
    from nclayers.report.figures import plot_layout

    figs = [Figure(p, p.name) for p in sorted(folder.glob("*.png"))]
    drawn = folder / "figures" / "layers.png"
    if layers and not drawn.is_file():
        noisy = any(r.get("view") == "noisy" for r in layers)
        several = len({r.get("run") for r in layers}) > 1  # one curve per run
        plot_layout(layers, drawn.with_suffix(""), "noisy" if noisy else "clean",
                    curves="run" if several else None,
                    memorization=ratios if noisy else None, formats=("png",))  # fmt: skip
    if drawn.is_file():
        figs.insert(0, Figure(drawn, "NC per block (the paper's layout)"))
    if (folder / DYNAMICS).is_file():
        from nclayers.report.dynamics import plot_dynamics

        dyn = folder / "figures" / "nc_dynamics.png"
        if not dyn.is_file():
            plot_dynamics(folder / DYNAMICS, dyn)
        figs.append(Figure(dyn, "NC per block during training"))
    return figs


def memorization_section(ratios: Table) -> Section:
    from nclayers.memorization import memorization_layers

    runs = list(dict.fromkeys(r.get("run") for r in ratios))
    text = []
    for run in runs:
        mine = Table(r for r in ratios if r.get("run") == run)
        layers = memorization_layers(mine)
        who = f"run {run}: " if len(runs) > 1 else ""
        text.append(who + describe_memorization(mine, layers))
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


def other_tables(folder: Path) -> list[Section]:
    """Every other CSV of the folder (probe.csv, prune.csv, ...) as a collapsed section."""
    out = []
    for path in sorted(folder.glob("*.csv")):
        if path.name in KNOWN_TABLES:
            continue
        table = _table(path)
        title = {PROBE: "Linear probes (probe.csv)", PRUNE: "Pruning (prune.csv)"}
        out.append(Section(title.get(path.name, path.name), table=table,
                           collapsed=path.name not in title))  # fmt: skip
    return out


def data_conditions(config: dict | None) -> dict[str, Any]:
    data = (config or {}).get("data") or {}
    out: dict[str, Any] = {"data set": data.get("name")}
    noise = data.get("noise")
    if has_label_noise(noise):
        shuffled = isinstance(noise, (int, float))
        out["label noise"] = (
            f"{float(noise):.0%} of the training labels shuffled"
            if shuffled
            else f"CIFAR-10N {noise}"
        )
        out["noise seed"] = data.get("noise_seed")
    else:
        out["label noise"] = "none (clean labels)"
    for key in ("corruption", "severity", "noise_mode"):
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
    if train:
        out["recipe"] = (
            f"{train.get('optimizer')} lr {train.get('lr')} ({train.get('schedule')}), "
            f"{train.get('epochs')} epochs, batch {train.get('batch_size')}, weight decay "
            f"{train.get('weight_decay')}"
        )
    return out


def accuracies(summary: dict, train: dict, layers: Table) -> dict[str, Any]:
    out: dict[str, Any] = {}
    final = train.get("final") or {}
    if final:
        out["final test accuracy"] = final.get("test_acc")
        view = train.get("train_labels", "clean")
        out[f"final train accuracy ({view} labels)"] = final.get("train_acc")
    for split, views in (summary.get("accuracy") or {}).items():
        for view, acc in (views or {}).items():
            out[f"accuracy, {split} split, {view} labels"] = acc
    return out


def timings(summary: dict, train: dict, stages: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if train.get("train_seconds") is not None:
        out["training time"] = f"{train['train_seconds']:.1f} s"
    for split, s in (summary.get("seconds") or {}).items():
        out[f"analysis time ({split})"] = f"{s:.1f} s"
    for name, info in (stages or {}).items():
        if isinstance(info, dict) and info.get("seconds") is not None:
            out[f"stage {name}"] = f"{info['seconds']:.1f} s"
    if summary.get("device") or train.get("device"):
        out["device"] = summary.get("device") or train.get("device")
    return out


# ----------------------------------------------------------------------------- a sweep
def _sweep_sections(out: Path) -> tuple[str, list[Section]]:
    info = _json(out / "sweep.json")
    summary = info.get("summary") or {}
    runs = _table(out / "runs.csv")
    layers = _table(out / LAYERS)
    ratios = _table(out / MEMORIZATION)
    axes = info.get("axes", {})
    overview = {
        "sweep file": info.get("file"),
        "overrides": " ".join(info.get("overrides") or []) or None,
        "axes": "; ".join(f"{a}: {', '.join(map(str, v))}" for a, v in axes.items()),
        "stages": ", ".join(info.get("stages", [])),
        "runs": len(info.get("runs", [])),
        "stage status": ", ".join(f"{k}: {v}" for k, v in (summary.get("stages") or {}).items()),
        "run folders": str(Path(info.get("root", "")) / "runs"),
    }
    if summary.get("seconds") is not None:
        overview["sweep time (this invocation)"] = f"{summary['seconds']:.1f} s"
    sections = [Section("Overview", text=info.get("description", ""), items=overview)]
    figures = [Figure(p, p.name) for p in _sweep_pngs(out, info)]
    if figures:
        sections.append(Section("Figures", figures=figures))
    if runs:
        sections.append(Section("Runs", table=runs))
    if ratios:
        sections.append(memorization_section(ratios))
    if layers:
        sections.append(Section("Per-layer table (layers.csv)", table=layers, collapsed=True))
    sections += other_tables(out)
    details = []
    for r in info.get("runs", []):
        folder = Path(r["folder"])
        config = _yaml(folder / CONFIG)
        train = _json(folder / TRAIN_SUMMARY)
        summary = _json(folder / SUMMARY)
        items = {
            "id": r["id"],
            "folder": str(folder),
            **r.get("labels", {}),
            **data_conditions(config),
            **model_description(config),
            **accuracies(summary, train, Table()),
            **timings(summary, train, _json(folder / STAGES)),
        }
        err = folder / "error.log"
        details.append(Section(
            f"run {r['index']}: " + ", ".join(f"{k}={v}" for k, v in r.get("labels", {}).items()),
            items=items, code=err.read_text()[-4000:] if err.is_file() else "", collapsed=True,
        ))  # fmt: skip
    if details:
        sections.append(Section("Each run", subsections=details))
    sweep_file = Path(info.get("file", ""))
    if sweep_file.is_file():
        sections.append(Section(f"Sweep file ({sweep_file.name})", code=sweep_file.read_text(),
                                collapsed=True))  # fmt: skip
    return str(info.get("title") or f"nclayers sweep {out.name}"), sections


def _sweep_pngs(out: Path, info: dict) -> list[Path]:
    files = (info.get("summary") or {}).get("files", {}).get("figures", [])
    pngs = [Path(f) for f in files if str(f).endswith(".png") and Path(f).is_file()]
    return pngs or sorted(out.glob("*.png"))


# ----------------------------------------------------------------------------- figures
def draw_figures(
    figures: list[dict], out: Path, layers: Table, memo: Table, title: str, name: str
) -> list[Path]:
    from nclayers.report.figures import Panel, plot_layout

    if not layers:
        return []
    paths = []
    for i, fig in enumerate(figures):
        layout = fig.get("layout", "clean")
        if "panels" in fig:
            layout = tuple(Panel(m) for m in fig["panels"])
        stem = fig.get("name") or (name if len(figures) == 1 else f"{name}-{i + 1}")
        paths += plot_layout(
            layers, out / stem, layout, rows=fig.get("rows"), curves=fig.get("curves"),
            x=fig.get("x", "block"), memorization=memo, title=fig.get("title") or title,
        )  # fmt: skip
    return paths


# ----------------------------------------------------------------------------- plot verb
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


# ----------------------------------------------------------------------------- files
def _ratios(folder: Path, layers: Table) -> Table:
    ratios = _table(folder / MEMORIZATION)
    if ratios or not any(r.get("view") == "noisy" for r in layers):
        return ratios
    from nclayers.memorization import memorization_ratio

    try:
        return memorization_ratio(layers, split="train")
    except ValueError:
        return Table()


def _table(path: Path) -> Table:
    return Table.from_csv(path) if Path(path).is_file() else Table()


def _json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _yaml(path: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except (FileNotFoundError, yaml.YAMLError):
        return {}
