"""`nclayers <verb>`: parse the command line and call the jobs; no logic lives here.

Every verb takes an optional YAML config or run folder, `key=value` overrides, and
`--out DIR`, which always means where results go. A bad input (`NCLayersError`) is
printed as one line and exits with status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nclayers.console import command_logging

EPILOG = "Settings are key=value overrides of the YAML config, e.g. train.epochs=15 data.dir=DIR."


def _resolve(args, verb: str):
    """(config, run folder) of a verb: from a run folder (its config.yaml; --out elsewhere
    reads its weights), a config file, or overrides alone."""
    from nclayers.config import load_config
    from nclayers.errors import NCLayersError
    from nclayers.jobs.common import check_measured_settings, run_folder
    from nclayers.jobs.folder import CHECKPOINT

    overrides = list(args.overrides)
    target = getattr(args, "config", None)
    if target and "=" in target and not Path(target).exists():  # no file given: an override
        overrides.insert(0, target)
        target = None
    if getattr(args, "data_dir", None):
        overrides.append(f"data.dir={args.data_dir}")
    if getattr(args, "device", None):
        overrides.append(f"device={args.device}")
    if target and not Path(target).exists() and Path(target).suffix not in (".yaml", ".yml"):
        raise NCLayersError(
            f"run folder {target!r} does not exist; pass a run folder (written by nclayers "
            "train or analyze) or a config file (.yaml)"
        )
    if target and Path(target).is_dir():
        source = run_folder(target)
        cfg = source.config(overrides)
        if verb != "train":  # a verb that measures the run: its weights, as trained
            check_measured_settings(source, cfg, verb)
        folder = run_folder(args.out or target)
        other = cfg.model.checkpoint or cfg.model.untrained  # weights chosen on purpose
        if folder.path.resolve() != source.path.resolve() and not other:
            if source.exists(CHECKPOINT):  # measure the run's weights, write elsewhere
                cfg = cfg.updated({"model.checkpoint": str(source.file(CHECKPOINT).resolve())})
        return _absolute_paths(cfg), folder
    cfg = load_config(target, overrides)
    default = f"runs/{Path(target).stem}" if target else f"runs/{verb}"
    return _absolute_paths(cfg), run_folder(args.out or default)


def _absolute_paths(cfg):
    """`cfg` with its relative file paths (model.checkpoint, data.dir) made absolute, so
    that a run folder's config.yaml means the same files from any working directory."""
    given = {"model.checkpoint": cfg.model.checkpoint, "data.dir": cfg.data.dir}
    changes = {k: str(Path(v).resolve()) for k, v in given.items()
               if v and not Path(v).is_absolute() and Path(v).exists()}  # fmt: skip
    return cfg.updated(changes) if changes else cfg


def _main_rank() -> bool:
    from nclayers.runtime import is_main

    return is_main()


def cmd_demo(args) -> None:
    overrides = [*args.overrides] + ([f"device={args.device}"] if args.device else [])
    if args.text:
        from nclayers.jobs.text_demo import run_text_demo

        summary = run_text_demo(args.out or "runs/demo-text", overrides, progress=not args.quiet)
    else:
        from nclayers.jobs.demo import run_demo

        summary = run_demo(args.out or "runs/demo", overrides, progress=not args.quiet)
    print(summary["text"])


def cmd_train(args) -> None:
    from nclayers.jobs import train_job

    cfg, folder = _resolve(args, "train")
    result = train_job(cfg, folder, progress=not args.quiet, resume=args.resume,
                       force=args.force)  # fmt: skip
    final = result.summary["final"] or {}
    if _main_rank() and "test_perplexity" in final:  # a language model
        print(f"test perplexity {final['test_perplexity']:.3f}; run folder {folder.path}")
    elif _main_rank():
        print(f"test accuracy {final.get('test_acc', float('nan')):.4f}; run folder {folder.path}")


def cmd_analyze(args) -> None:
    from nclayers.jobs import analyze_job
    from nclayers.table import shown_columns

    cfg, folder = _resolve(args, "analyze")
    result = analyze_job(cfg, folder, progress=not args.quiet)
    if _main_rank():
        cols = ["split", "view", "layer", "block", "dim", *shown_columns("analyze")]
        print(result.table.format(cols))
        print(f"wrote {folder.file('layers.csv')} and summary.json")


def cmd_probe(args) -> None:
    from nclayers.jobs import probe_job
    from nclayers.table import shown_columns

    cfg, folder = _resolve(args, "probe")
    table = probe_job(cfg, folder, progress=not args.quiet)
    if _main_rank():
        print(table.format(["layer", "block", "dim", "ncc_acc", *shown_columns("probe"),
                            "probe_underfit"]))  # fmt: skip
        from nclayers.probing import underfit_note

        note = underfit_note(table)
        if note:
            print(note)
        print(f"wrote probe_acc into {folder.file('layers.csv')}, probe.csv, probe_heads.pt")


def cmd_blocks(args) -> None:
    import torch

    from nclayers.config import load_config
    from nclayers.jobs import build_from_config
    from nclayers.models import find_blocks, get_entry
    from nclayers.taps import probe_shapes

    cfg = load_config(None, [f"model.name={args.model}", *args.overrides])
    if args.model.startswith("hf:"):  # a transformers model: its own head, its own inputs
        from nclayers.models.hf import example_inputs, is_vision

        # The layers do not depend on the weights: built from the config, fast, and a
        # folder holding only a config.json lists its layers too.
        model = build_from_config(cfg.model, args.num_classes or 0, fresh=True).eval()
        sample = example_inputs(model, batch=1, length=8)
        what = f"a 1x{sample.shape[1]}x{sample.shape[2]}x{sample.shape[3]} input" if is_vision(
            model) else "a sequence of 8 tokens"  # fmt: skip
    else:
        model = build_from_config(cfg.model, args.num_classes or 10).eval()
        size = args.input_size or (get_entry(args.model).input_size if ":" not in args.model
                                   else 32)  # fmt: skip
        sample, what = torch.zeros(1, 3, size, size), f"a 1x3x{size}x{size} input"
    # In forward order, a module that runs k > 1 times as k layers NAME#1 ... NAME#k.
    blocks = find_blocks(model, cfg.model.blocks, pool=cfg.model.pool, sample=sample)
    shapes = probe_shapes(model, blocks, sample)
    print(f"{args.model}: {len(blocks)} blocks on {what}")
    print(f"{'index':>5}  {'module':<32} {'output shape':<22} {'pool':<7} {'dim':>5}")
    for i, (b, (shape, dim)) in enumerate(zip(blocks, shapes, strict=True), start=1):
        print(f"{i:>5}  {b.name:<32} {list(shape)!s:<22} {b.pool:<7} {dim:>5}")


def cmd_sweep(args) -> int:
    from nclayers.jobs.launch import run_sweep
    from nclayers.jobs.sweep import FAILED, commands, describe, load_sweep, run_one, stage_failed

    sweep = load_sweep(args.file, args.overrides)
    if args.print:
        print("\n".join(commands(sweep)))
        print(describe(sweep), file=sys.stderr)
        return 0
    if args.index is not None:
        status = run_one(sweep, args.index, progress=not args.quiet)
        return int(any(map(stage_failed, status["stages"].values())))
    gpus = [int(g) for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    summary = run_sweep(sweep, launcher=args.launcher, gpus=gpus, progress=not args.quiet,
                        collect_only=args.collect, wait=not args.no_wait)  # fmt: skip
    if "submitted" in summary:
        print(f"submitted Slurm jobs {', '.join(summary['submitted'])}; then: "
              f"nclayers sweep {args.file} --collect")  # fmt: skip
        return 0
    print(f"{describe(sweep)}\n  stages: {summary['stages']}")
    for key, path in summary["files"].items():
        print(f"  {key}: {', '.join(path) if isinstance(path, list) else path}")
    for error in summary.get("figure_errors", []):
        print(f"  {error}")
    if "report" in summary:
        print(f"  report: {summary['report']}")
    print(f"  {summary['seconds']:.0f} s")
    for problem in summary.get("damaged", []):  # gathered without them: said, one line each
        print(f"nclayers sweep: {problem}", file=sys.stderr)
    # Failed stages were recorded and the others ran; the exit status still says so.
    failed = any(k.endswith(tuple(f" {s}" for s in FAILED)) for k in summary["stages"])
    return int(failed or bool(summary.get("damaged")))


def cmd_upgrade(args) -> None:
    from nclayers.jobs.folder import RunFolder

    done = RunFolder(args.run).upgrade()
    print(f"{args.run}: " + (f"kept {', '.join(done)} as measurements" if done else "up to date"))


def cmd_report(args) -> None:
    from nclayers.jobs.report import write_report
    from nclayers.jobs.sweep import sweep_report

    sweep_file = Path(args.path).suffix in (".yaml", ".yml")
    out = args.out
    if out and Path(out).is_dir():  # a folder: the report goes inside it
        out = str(Path(out) / "report.html")
    print((sweep_report if sweep_file else write_report)(args.path, out=out))


def cmd_plot(args) -> None:
    if Path(args.csv).is_dir() or args.layout:  # a sweep's folder, or a paper layout
        from nclayers.jobs.report import plot_paths

        for p in plot_paths(args.csv, layout=args.layout, rows=args.rows, curves=args.curves,
                            x=args.x, out=args.out):  # fmt: skip
            print(p)
        return
    from nclayers.errors import NCLayersError
    from nclayers.jobs.report import plot_csv
    from nclayers.table import Table

    table = Table.from_csv(args.csv)
    analyzed = "pass a layers.csv written by nclayers analyze"
    wanted = args.metric or [m for m in ("nc1", "nc2", "ncc_acc", "probe_acc") if m in
                             table.columns][:1] or ["nc1"]  # fmt: skip
    _check_columns(args.csv, table, {m: f"--metric one of them, or {analyzed}" for m in wanted})
    if args.split and not len(table.where(split=args.split)):
        splits = sorted({str(s) for s in table.column("split") if s not in (None, "")})
        raise NCLayersError(f"--split {args.split}: {args.csv} has no rows of that split; "
                            f"its splits: {', '.join(splits) or 'none'}")  # fmt: skip
    for p in plot_csv(args.csv, args.out, split=args.split, metrics=args.metric):
        print(p)


def cmd_memorization(args) -> None:
    from nclayers.errors import NCLayersError

    if Path(args.csv).is_dir():  # a run folder: measure its training split
        from nclayers.jobs import memorization_job

        args.config = args.csv
        cfg, folder = _resolve(args, "memorization")
        result = memorization_job(cfg, folder, progress=not args.quiet)
        if _main_rank():
            _print_ratios(result.ratios, result.info, folder)
        return
    if args.overrides:
        raise NCLayersError("key=value overrides apply to a run folder, not to a layers.csv")
    from nclayers.jobs.memorization import memorization_from_csv
    from nclayers.memorization import memorization_layers
    from nclayers.table import Table

    _check_columns(args.csv, Table.from_csv(args.csv), {
        "nc1": "pass a layers.csv written by nclayers analyze",
        args.key: "--key names the column that tells clean from noisy rows: view (label "
        "noise), input (corrupted inputs, written by nclayers memorization RUN) or run",
    })  # fmt: skip
    options = {"split": args.split, "clean": args.clean, "noisy": args.noisy, "key": args.key}
    ratios, written = memorization_from_csv(args.csv, args.out, **options)
    print(ratios.format(["layer", "block", "nc1_clean", "nc1_noisy", "ratio"]))
    print(f"memorization layers (ratio > 1): {memorization_layers(ratios)}")
    print("wrote " + ", ".join(map(str, written)))


def _check_columns(csv: str, table, needed: dict[str, str]) -> None:
    """Refuse a table that lacks a column a verb reads: {column: the fix}."""
    from nclayers.errors import NCLayersError

    have = table.columns
    for name, fix in needed.items():
        if name not in have:
            raise NCLayersError(
                f"{csv} has no {name!r} column (its columns: {', '.join(have)}); {fix}"
            )


def _print_ratios(ratios, meta: dict, folder) -> None:
    other = "nc1_corrupted" if meta["kind"] == "corruption" else "nc1_noisy"
    cols = ["layer", "block", "nc1_clean", other, "ratio"]
    if "ratio_changed" in ratios.columns:
        cols += ["nc1_changed_clean", "nc1_changed_noisy", "ratio_changed"]
    print(ratios.format(cols))
    if meta["kind"] == "label_noise":
        print(f"changed labels: {meta['changed']} of {meta['samples']} ({meta['noise_rate']:.2%});"
              f" memorized (fitted to their training label): {meta['memorized']:.2%}")  # fmt: skip
    print(f"memorization layers (ratio > 1): {meta['memorization_layers']}")
    print(f"wrote {folder.file('memorization.csv')}, memorization.png, summary.json")


def cmd_prune(args) -> None:
    from nclayers.jobs import prune_job

    args.config = args.run
    extra = []
    if args.blocks is not None:
        extra.append(f"prune.blocks={args.blocks}")
    if args.finetune_epochs is not None:
        extra.append(f"prune.finetune_epochs={args.finetune_epochs}")
    args.overrides = [*args.overrides, *extra]
    cfg, folder = _resolve(args, "prune")
    result = prune_job(cfg, folder, progress=not args.quiet)
    if not _main_rank():
        return
    for note in result.notes:
        print(note)
    cols = ["variant", "finetune_epochs", "n_removed", "layers", "blocks", "test_acc",
            "acc_change", "acc_change_same_finetune", "nc1_last"]  # fmt: skip
    if "perplexity" in result.summary.columns:  # a language model
        cols.insert(6, "perplexity")
    if any(r["finetune_epochs"] for r in result.summary):  # the fine-tune's lr and baseline
        cols += ["finetune_lr", "baseline_drop", "baseline_flag"]
    print(result.summary.format(cols))
    print(result.text)
    print(f"wrote {folder.file('prune.csv')}, prune_layers.csv and prune.png")


def cmd_equality(args) -> None:
    from nclayers.config import load_config
    from nclayers.jobs.equality import equality_job, equality_tables
    from nclayers.jobs.folder import CONFIG

    target = Path(args.target)
    if target.is_dir() and (target / CONFIG).is_file():  # a run: its settings, its stage
        args.config, args.out = args.target, None
        cfg, folder = _resolve(args, "equality")
        results = [equality_job(cfg, folder, plot=not args.no_plot)]
    else:  # a sweep folder or a loose layers.csv
        results = equality_tables(target, load_config(None, args.overrides).equality,
                                  plot=not args.no_plot)  # fmt: skip
    for result in results if _main_rank() else ():
        print(result.format())
        print("wrote " + ", ".join(str(p) for p in result.written))


def cmd_env(args) -> int:
    from nclayers.env import describe, self_check

    for name, value in describe():
        print(f"{name:<13} {value}")
    if not args.check:
        return 0
    print("self-check:")
    checks = self_check(args.device or None, args.skip or ())
    for check in checks:
        print("  " + check.line(), flush=True)
    return 0 if all(c.ok for c in checks) else 1


def cmd_make_folder(args) -> None:
    from nclayers.data.make_folder import make_image_folder, make_k1000_folder

    if args.k1000:

        def given_or(value, default):
            return default if value is None else value

        manifest = make_k1000_folder(args.out, per_class=given_or(args.per_class, 2),
                                     val_per_class=given_or(args.val_per_class, 1),
                                     size=given_or(args.size, 16), seed=args.seed)  # fmt: skip
    else:
        given = {"per_class": args.per_class, "val_per_class": args.val_per_class,
                 "size": args.size}  # fmt: skip
        manifest = make_image_folder(
            args.out, source=args.source, data_dir=args.data_dir, classes=args.classes,
            grain=args.grain, seed=args.seed, **{k: v for k, v in given.items() if v is not None},
        )  # fmt: skip
    counts = {k: v for k, v in manifest.items() if isinstance(v, (int, str))}
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def _common(p: argparse.ArgumentParser, out_help: str = "run folder for results") -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--out", help=out_help)
    p.add_argument("--data-dir", help="local data folder (same as data.dir=...)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (same as device=...)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nclayers",
        description="Per-layer neural collapse of classifiers: which layers compress and "
        "separate the classes, and which memorize noise.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _run_verbs(sub)
    _table_verbs(sub)
    _sweep_verbs(sub)
    return parser


def _verb(sub, name: str, fn, help_text: str, target: str | None = "config", **kw):
    """A verb on a run: its target (config file or run folder), overrides and options."""
    p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG)
    if target:
        about = kw.get("target_help", "YAML config file or run folder")
        p.add_argument(target, nargs="?" if target == "config" else None, help=about)
    _common(p, kw.get("out_help", "run folder for results"))
    p.set_defaults(fn=fn)
    return p


def _run_verbs(sub) -> None:
    p = _verb(
        sub,
        "demo",
        cmd_demo,
        "Train and measure a small ResNet on the embedded digits, offline.",
        target=None,
        out_help="folder for the demo (default runs/demo, runs/demo-text with --text)",
    )
    p.add_argument(
        "--text",
        action="store_true",
        help="the text demo: a small language model on the standard library's sources and "
        "a text classifier, token-level collapse, probes, which layers can go (needs the hf "
        "extra)",
    )
    p = _verb(sub, "train", cmd_train, "Train a model with a paper recipe.")
    p.add_argument("--resume", action="store_true", help="continue the run's checkpoint")
    p.add_argument("--force", action="store_true", help="train from scratch over a run")
    _verb(sub, "analyze", cmd_analyze, "Measure NC1, NC2 and NCC accuracy of every block.")
    _verb(
        sub, "probe", cmd_probe, "Train a linear probe on every block of the frozen model at once."
    )
    p = _verb(
        sub,
        "memorization",
        cmd_memorization,
        "Memorization ratio per layer: of a run "
        "folder (label noise or corrupted inputs), or from a layers.csv.",
        target="csv",
        target_help="a run folder trained with data.noise or data.corruption, or a "
        "layers.csv with clean and noisy rows",
    )
    p.add_argument("--split", default="train")
    p.add_argument("--key", default="view", help="column telling clean from noisy: view, input")
    p.add_argument("--clean", default="clean")
    p.add_argument("--noisy", default="noisy")
    p = _verb(
        sub,
        "prune",
        cmd_prune,
        "Remove a run's plateau (or listed) blocks by identity; "
        "compare with as many random and last blocks, before and after a fine-tune.",
        target="run",
        target_help="a trained run's folder",
    )
    p.add_argument("--blocks", help="plateau (default), or indices / module names: 10,11,layer3.2")
    p.add_argument("--finetune-epochs", type=int, help="fine-tune every variant (prune.*)")
    p = sub.add_parser("blocks", help="List a model's blocks and their pooled dimensions.")
    p.add_argument("model", help="registry name, package.module:function or hf:PATH_OR_ID")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the head (default 10; hf: the model's own)")  # fmt: skip
    p.add_argument("--input-size", type=int, default=None)
    p.set_defaults(fn=cmd_blocks)


def _table_verbs(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="Per-layer figures from a layers.csv, or the paper's "
        "layouts from a sweep's folder or tidy CSV (--layout).",
    )
    p.add_argument("csv", help="a layers.csv written by analyze/demo/sweep, or a sweep's folder")
    p.add_argument("--layout", help="clean, clean-nc, noisy or nc-vs-probe: the paper's panels")
    p.add_argument("--rows", help="column whose values make the rows (e.g. model)")
    p.add_argument("--curves", help="column whose values make the curves (e.g. noise)")
    p.add_argument("--x", default="block", choices=("block", "depth"), help="block or depth")
    p.add_argument("--metric", action="append", help="nc1, nc2, ncc_acc, ... (repeatable)")
    p.add_argument("--split", help="only rows of this split")
    p.add_argument("--out", help="folder for the PNG files (default: beside the CSV)")
    p.set_defaults(fn=cmd_plot)
    p = sub.add_parser(
        "equality",
        help="Are all layers equal? Per-block enhancement, the "
        "law-of-separation fit against a plateau, the redundant blocks.",
        epilog="Settings: equality.plateau_fraction=0.5 equality.split=test ...",
    )
    p.add_argument("target", help="a run folder, a sweep folder of runs, or a layers.csv")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="equality.* settings")
    p.add_argument("--no-plot", action="store_true", help="no equality.png")
    p.add_argument("-q", "--quiet", action="store_true", help="no logs")
    p.set_defaults(fn=cmd_equality)
    p = sub.add_parser("report", help="One self-contained HTML report of a run or a sweep.")
    p.add_argument("path", help="a run folder, a sweep's output folder, or a sweep file")
    p.add_argument("--out", help="the HTML file (default: PATH/report.html)")
    p.add_argument("-q", "--quiet", action="store_true", help="no logs")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("upgrade", help="Convert a run folder of an older nclayers in place.")
    p.add_argument("run", help="the run folder")
    p.set_defaults(fn=cmd_upgrade)


def _sweep_verbs(sub) -> None:
    p = sub.add_parser(
        "sweep",
        epilog=EPILOG,
        help="Run a sweep file: a grid of runs and "
        "their stages, then one tidy table, the figures and the report.",
    )
    p.add_argument("file", help="sweep YAML, e.g. configs/paper/fig3-cpu-mini.yaml")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="settings for every run; slurm.KEY=VALUE for the launcher",
    )
    p.add_argument("--print", action="store_true", help="print one command per run and stop")
    p.add_argument("--index", type=int, help="run only entry I (e.g. $SLURM_ARRAY_TASK_ID)")
    p.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help="local: here (default); slurm: one job array through submitit",
    )
    p.add_argument("--gpus", help="local: one run per GPU at a time, e.g. 0,1,2,3")
    p.add_argument("--no-wait", action="store_true", help="slurm: submit and return")
    p.add_argument(
        "--collect",
        action="store_true",
        help="only gather the finished runs, draw the figures and the report",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or logs")
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser(
        "make-folder",
        help="Write an ImageNet-style image folder (train/ and "
        "val/ class folders of JPEGs) from digits or CIFAR-10, for tests and the "
        "mini sweeps; --k1000 writes a 1,000-class one.",
    )
    p.add_argument("out", help="the folder to write (new or empty)")
    p.add_argument("--source", choices=("digits", "cifar10"), default="digits")
    p.add_argument("--data-dir", help="cifar10: the folder holding cifar-10-batches-py/")
    p.add_argument("--per-class", type=int, help="training images per class (50; --k1000: 2)")
    p.add_argument("--val-per-class", type=int, help="validation images per class (20; --k1000: 1)")
    p.add_argument("--size", type=int, help="image width in pixels, upscaled (80; --k1000: 16)")
    p.add_argument("--classes", type=int, help="the first N classes only")
    p.add_argument("--grain", type=float, default=0.0, help="film grain (bigger JPEGs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k1000", action="store_true", help="1,000 classes of tiny images")
    p.set_defaults(fn=cmd_make_folder)
    p = sub.add_parser(
        "env",
        help="Versions, devices, threads and huge pages, for a bug report; --check runs a "
        "self-check of each device (~10 s each).",
    )
    p.add_argument("--check", action="store_true", help="decode, bf16, compile and reduce checks")
    p.add_argument("--device", action="append", help="check only this device (repeatable)")
    p.add_argument("--skip", action="append", help="leave out a check: decode, bf16, compile, "
                   "gloo or nccl (repeatable)")  # fmt: skip
    p.set_defaults(fn=cmd_env)


def main(argv: list[str] | None = None) -> int:
    from nclayers.errors import NCLayersError

    parser = build_parser()
    # key=value overrides may follow options too (`--out DIR train.epochs=3`).
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        with command_logging(getattr(args, "quiet", False), _main_rank()):
            rc = args.fn(args)  # a verb may return an exit status (a sweep entry failed)
    except NCLayersError as err:
        print(f"nclayers {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except (NotADirectoryError, IsADirectoryError, PermissionError) as err:
        print(f"nclayers {args.verb}: error: {_path_problem(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nclayers {args.verb}: interrupted", file=sys.stderr)
        return 130
    return rc or 0


def _path_problem(err: OSError) -> str:
    """One line for a path the user gave that cannot be written or read as asked."""
    name = str(err.filename or "a path")
    base = Path(name).name
    if base == ".lock" or (base.startswith(".") and base.endswith(".tmp")):
        name = f"{Path(name).parent}/"  # a file nclayers writes there: the folder is the news
    if isinstance(err, NotADirectoryError):
        return (f"{name}: part of this path is a file, not a folder; choose another folder "
                "(--out DIR)")  # fmt: skip
    if isinstance(err, IsADirectoryError):
        return f"{name}: is a folder where a file is expected; name a file"
    return (f"{name}: permission denied; write the results elsewhere with --out DIR, or "
            "make the folder writable")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
