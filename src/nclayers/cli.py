"""`nclayers <verb>`: parse the command line and call the library; no logic lives here."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nclayers.errors import NCLayersError

EPILOG = "Settings are key=value overrides of the YAML config, e.g. train.epochs=15 data.dir=DIR."


def _config(args, default_out: str):
    from nclayers.config import Config, load_config

    overrides = list(args.overrides)
    path = getattr(args, "config", None)
    if path and "=" in path and not Path(path).is_file():  # no file given: an override
        overrides.insert(0, path)
        path = None
    if args.out:
        overrides.append(f"out={args.out}")
    if getattr(args, "data_dir", None):
        overrides.append(f"data.dir={args.data_dir}")
    if getattr(args, "device", None):
        overrides.append(f"device={args.device}")
    if path and Path(path).is_dir():  # a run folder: its saved config, results written there
        from nclayers.jobs import RunFolder

        return RunFolder(path).load_config(overrides)
    cfg = load_config(path, overrides)
    if cfg.out == Config().out:  # neither the file nor the command line chose a folder
        cfg.out = default_out
    return cfg


def cmd_demo(args) -> None:
    from nclayers.jobs.demo import run_demo

    overrides = [*args.overrides] + ([f"device={args.device}"] if args.device else [])
    run_demo(args.out or "runs/demo", overrides, progress=not args.quiet)


def cmd_train(args) -> None:
    from nclayers.jobs import train_run

    cfg = _config(args, "runs/train")
    summary = train_run(cfg, resume=args.resume, progress=not args.quiet)
    final = summary["final"] or {}
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, say it once
        print(f"test accuracy {final.get('test_acc', float('nan')):.4f}; run folder {cfg.out}")


def cmd_analyze(args) -> None:
    from nclayers.jobs import analyze_run

    cfg = _config(args, "runs/analyze")
    table = analyze_run(cfg, progress=not args.quiet)
    cols = ["split", "view", "layer", "block", "dim", "nc1", "nc2", "ncc_acc"]
    print(table.format(cols))
    print(f"wrote {Path(cfg.out) / 'layers.csv'} and summary.json")


def cmd_probe(args) -> None:
    from nclayers.jobs.probe import probe_run

    cfg = _config(args, "runs/probe")
    table = probe_run(cfg, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(table.format(["layer", "block", "dim", "probe_acc"]))
        print(f"wrote probe_acc into {Path(cfg.out) / 'layers.csv'}, probe.csv, probe_heads.pt")


def cmd_blocks(args) -> None:
    import torch

    from nclayers.jobs import build_from_config
    from nclayers.models import find_blocks, get_entry
    from nclayers.taps import probe_shapes

    cfg = _config(args, "runs/blocks")
    cfg.model.name = args.model
    model = build_from_config(cfg.model, args.num_classes).eval()
    size = args.input_size or (get_entry(args.model).input_size if ":" not in args.model else 32)
    blocks = find_blocks(model, cfg.model.blocks, pool=cfg.model.pool)
    shapes = probe_shapes(model, blocks, torch.zeros(1, 3, size, size))
    print(f"{args.model}: {len(blocks)} blocks on a 1x3x{size}x{size} input")
    print(f"{'index':>5}  {'module':<32} {'output shape':<22} {'pool':<7} {'dim':>5}")
    for i, (b, (shape, dim)) in enumerate(zip(blocks, shapes, strict=True), start=1):
        print(f"{i:>5}  {b.name:<32} {list(shape)!s:<22} {b.pool:<7} {dim:>5}")


def cmd_sweep(args) -> int:
    from nclayers.jobs.sweep import commands, describe, load_sweep, run_one, run_sweep

    sweep = load_sweep(args.file, args.overrides)
    if args.print:
        print("\n".join(commands(sweep)))
        print(describe(sweep), file=sys.stderr)
        return 0
    if args.index is not None:
        status = run_one(sweep, args.index, progress=not args.quiet)
        return int(any(s["status"] != "done" for s in status["stages"].values()))
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    summary = run_sweep(sweep, gpus=gpus, progress=not args.quiet, collect_only=args.collect)
    print(f"{describe(sweep)}\n  stages: {summary['stages']}")
    for key, path in summary["files"].items():
        print(f"  {key}: {', '.join(path) if isinstance(path, list) else path}")
    if "report" in summary:
        print(f"  report: {summary['report']}")
    print(f"  {summary['seconds']:.0f} s")
    # Failed stages were recorded and the others ran; the exit status still says so.
    return int(any(k.endswith((" failed", " blocked")) for k in summary["stages"]))


def cmd_report(args) -> None:
    from nclayers.jobs.report import write_report
    from nclayers.jobs.sweep import sweep_report

    sweep_file = Path(args.path).suffix in (".yaml", ".yml")
    print((sweep_report if sweep_file else write_report)(args.path, out=args.out))


def cmd_plot(args) -> None:
    from nclayers.report.figures import plot_layers, plot_metric
    from nclayers.table import Table

    if Path(args.csv).is_dir() or args.layout:  # a sweep's folder, or a paper layout
        from nclayers.jobs.report import plot_paths

        for p in plot_paths(args.csv, layout=args.layout, rows=args.rows, curves=args.curves,
                            x=args.x, out=args.out):  # fmt: skip
            print(p)
        return
    table = Table.from_csv(args.csv)
    out = Path(args.out or Path(args.csv).parent)
    if args.split:
        table = table.where(split=args.split)
    if any(r.get("epoch") is not None for r in table):  # train's nc_dynamics.csv
        from nclayers.report.dynamics import plot_dynamics

        metrics = tuple(args.metric or ("nc1", "nc2"))
        paths = [plot_dynamics(table, out / f"{Path(args.csv).stem}.png", metrics)]
    elif args.metric:
        paths = [plot_metric(table, m, out / f"{m}.png") for m in args.metric]
    else:
        paths = plot_layers(table, out)
    for p in paths:
        if p:
            print(p)


def cmd_memorization(args) -> None:
    from nclayers.memorization import memorization_layers, memorization_ratio
    from nclayers.report.figures import plot_metric
    from nclayers.table import Table

    if Path(args.csv).is_dir():  # a run folder: measure its training split
        from nclayers.jobs.memorization import memorization_run

        overrides = [*args.overrides] + ([f"device={args.device}"] if args.device else [])
        ratios = memorization_run(args.csv, overrides, progress=not args.quiet)
        other = "nc1_corrupted" if ratios.meta["kind"] == "corruption" else "nc1_noisy"
        cols = ["layer", "block", "nc1_clean", other, "ratio"]
        if "ratio_changed" in ratios.columns:
            cols += ["nc1_changed_clean", "nc1_changed_noisy", "ratio_changed"]
        print(ratios.format(cols))
        if ratios.meta["kind"] == "label_noise":
            print(
                f"changed labels: {ratios.meta['changed']} of {ratios.meta['samples']} "
                f"({ratios.meta['noise_rate']:.2%}); memorized (fitted to their training "
                f"label): {ratios.meta['memorized']:.2%}"
            )
        print(f"memorization layers (ratio > 1): {ratios.meta['memorization_layers']}")
        print(f"wrote {Path(args.csv) / 'memorization.csv'}, memorization.png, summary.json")
        return
    if args.overrides:
        raise NCLayersError("key=value overrides apply to a run folder, not to a layers.csv")
    ratios = memorization_ratio(
        Table.from_csv(args.csv), split=args.split, clean=args.clean, noisy=args.noisy,
        key=args.key,
    )  # fmt: skip
    out = Path(args.out or Path(args.csv).parent)
    ratios.to_csv(out / "memorization.csv")
    plot_metric(ratios, "ratio", out / "memorization.png", group=("run",))
    print(ratios.format(["layer", "block", "nc1_clean", "nc1_noisy", "ratio"]))
    print(f"memorization layers (ratio > 1): {memorization_layers(ratios)}")


def _run_config(args):
    """A run folder's saved config <- overrides; results go to --out or the run folder."""
    from nclayers.jobs import RunFolder

    overrides = list(args.overrides)
    if getattr(args, "data_dir", None):
        overrides.append(f"data.dir={args.data_dir}")
    if getattr(args, "device", None):
        overrides.append(f"device={args.device}")
    cfg = RunFolder(args.run).load_config(overrides)
    if args.out:
        cfg.out = args.out
    return cfg


def cmd_prune(args) -> None:
    from nclayers.jobs.prune import prune_run

    cfg = _run_config(args)
    if args.blocks is not None:
        cfg.prune.blocks = args.blocks
    if args.finetune_epochs is not None:
        cfg.prune.finetune_epochs = args.finetune_epochs
    result = prune_run(cfg, run_dir=args.run, progress=not args.quiet)
    for note in result["notes"]:
        print(note)
    cols = ["variant", "finetune_epochs", "n_removed", "layers", "blocks", "test_acc",
            "acc_change", "acc_change_same_finetune", "nc1_last"]  # fmt: skip
    print(result["summary"].format(cols))
    print(result["text"])
    print(f"wrote {Path(cfg.out) / 'prune.csv'}, prune_layers.csv and prune.png")


def cmd_equality(args) -> None:
    from nclayers.config import load_config
    from nclayers.jobs.equality import equality_run

    cfg = load_config(None, args.overrides).equality
    for result in equality_run(args.target, cfg, plot=not args.no_plot):
        print(result.format())
        print("wrote " + ", ".join(str(p) for p in result.written))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nclayers",
        description="Per-layer neural collapse of classifiers: which layers compress and "
        "separate the classes, and which memorize noise.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, fn, help_text: str, config: bool = True):
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG)
        if config:
            p.add_argument("config", nargs="?", help="YAML config file or run folder (optional)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        p.add_argument("--out", help="run folder for results")
        p.add_argument("--data-dir", help="local data folder (same as data.dir=...)")
        p.add_argument("--device", help="cpu, cuda, cuda:N (same as device=...)")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        p.set_defaults(fn=fn)
        return p

    verb("demo", cmd_demo, "Train and measure a small ResNet on the embedded digits, offline.",
         config=False)  # fmt: skip
    p = verb("train", cmd_train, "Train a model with a paper recipe.")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    verb("analyze", cmd_analyze, "Measure NC1, NC2 and NCC accuracy of every block.")
    verb("probe", cmd_probe, "Train a linear probe on every block of the frozen model at once.")
    p = sub.add_parser("blocks", help="List a model's blocks and their pooled dimensions.")
    p.add_argument("model", help="registry name or package.module:function")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_blocks)
    p = sub.add_parser(
        "plot",
        help="Per-layer figures from a layers.csv, or the paper's "
        "layouts from a sweep's folder or tidy CSV (--layout).",
    )
    p.add_argument("csv", help="a layers.csv written by analyze/demo/sweep, or a sweep's folder")
    p.add_argument("--layout", help="clean, clean-nc, noisy or nc-vs-probe: the paper's panels")
    p.add_argument("--rows", help="column whose values make the rows (e.g. model)")
    p.add_argument("--curves", help="column whose values make the curves (e.g. noise)")
    p.add_argument("--x", default="block", choices=("block", "depth"),
                   help="block index or relative depth")  # fmt: skip
    p.add_argument("--metric", action="append", help="nc1, nc2, ncc_acc, ... (repeatable)")
    p.add_argument("--split", help="only rows of this split")
    p.add_argument("--out", help="folder for the PNG files (default: beside the CSV)")
    p.set_defaults(fn=cmd_plot)
    p = sub.add_parser(
        "memorization",
        help="Memorization ratio per layer: of a run folder (label noise or corrupted "
        "inputs), or from a layers.csv.",
    )
    p.add_argument("csv", metavar="RUN_OR_CSV",
                   help="a run folder trained with data.noise or data.corruption, or a "
                   "layers.csv with clean and noisy rows")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="changes to the run's config (e.g. device=cpu)")  # fmt: skip
    p.add_argument("--split", default="train")
    p.add_argument(
        "--key", default="view", help="column telling clean from noisy: view, input or run"
    )
    p.add_argument("--clean", default="clean")
    p.add_argument("--noisy", default="noisy")
    p.add_argument("--out", help="folder for memorization.csv/png (default: beside the CSV)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (same as device=...)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_memorization)
    p = sub.add_parser(
        "prune", epilog=EPILOG,
        help="Remove a run's plateau (or listed) blocks by identity; compare with as many "
        "random and last blocks, before and after a fine-tune.",
    )  # fmt: skip
    p.add_argument("run", help="a trained run's folder (config.yaml, checkpoint.pt)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--blocks", help="plateau (default), or indices / module names: 10,11,layer3.2")
    p.add_argument("--finetune-epochs", type=int, help="fine-tune every variant (prune.*)")
    p.add_argument("--out", help="folder for prune.csv/png (default: the run folder)")
    p.add_argument("--data-dir", help="local data folder (same as data.dir=...)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (same as device=...)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_prune)
    p = sub.add_parser(
        "equality", epilog="Settings: equality.plateau_fraction=0.5 equality.plateau_min_run=2 "
        "equality.split=test equality.view=clean equality.bic_margin=2",
        help="Are all layers equal? Per-block enhancement, the law-of-separation fit against "
        "a plateau, the redundant blocks, and the pruning result where measured.",
    )  # fmt: skip
    p.add_argument("target", help="a layers.csv, a run folder, or a sweep folder of runs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="equality.* settings")
    p.add_argument("--no-plot", action="store_true", help="no equality.png")
    p.set_defaults(fn=cmd_equality)
    p = sub.add_parser(
        "sweep",
        help="Run a sweep file: a grid of runs and their stages, then "
        "one tidy table, the figures and the report.",
        epilog=EPILOG,
    )
    p.add_argument("file", help="sweep YAML, e.g. configs/paper/fig3-cpu-mini.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings for every run")
    p.add_argument("--print", action="store_true", help="print one command per run and stop")
    p.add_argument("--index", type=int, help="run only entry I (e.g. $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--gpus", help="spread runs over these GPUs, one run per GPU: 0,1,2,3")
    p.add_argument(
        "--collect",
        action="store_true",
        help="only gather the finished runs, draw the figures and the report",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("report", help="One self-contained HTML report of a run or a sweep.")
    p.add_argument("path", help="a run folder, a sweep's output folder, or a sweep file")
    p.add_argument("--out", help="the HTML file (default: PATH/report.html)")
    p.set_defaults(fn=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may follow options too (`--out DIR train.epochs=3`).
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        rc = args.fn(args)  # a verb may return an exit status (e.g. a sweep entry failed)
    except (ValueError, FileNotFoundError) as err:
        print(f"nclayers {args.verb}: error: {err}", file=sys.stderr)
        return 2
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
