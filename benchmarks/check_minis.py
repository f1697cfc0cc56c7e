"""Can every CPU-mini twin's figure be read? Runs the `configs/paper/*-cpu-mini.yaml`
sweeps one after another (or gathers their finished results) and judges every run.

    python benchmarks/check_minis.py                          # run every twin, then judge
    python benchmarks/check_minis.py --only fig3,fig4 --json minis.json
    python benchmarks/check_minis.py --collect                # judge finished runs only
    python benchmarks/check_minis.py --threads 1 data.dir=/path/to/data

By hand, not in CI: all twins take an hour or more on 2 cores. A run can be read when

  clean labels and inputs   test accuracy >= 3 x chance (the report's rule,
                            `nclayers.jobs.report.readability`);
  noisy labels              it fits >= 90% of its changed labels (train_summary.json's
                            label_noise.memorized): Δ means nothing otherwise;
  corrupted inputs          it fits its corrupted training images: final train accuracy
                            >= 90% (the memorization ratio compares against them);

and every stage of its sweep is done. One line per run: figure, run labels, test and
train accuracy, memorized fraction (noisy runs), readable or why not, and the sweep's
wall time; besides the wall time (which counts the neighbours on a shared machine) the
CPU seconds of the sweep process and the seconds its stages took (`work`, summed from
the runs' stages.json: what the sweep costs from scratch, even when runs it shares with
another twin were already done). Exit status 1 when any run cannot be read.

Each sweep's output (-q) goes to ROOT/<name>/check_minis.log and its timing to
ROOT/<name>/check_minis.json, which `--collect` reads back.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from nclayers.data.noise import has_label_noise  # noqa: E402
from nclayers.errors import NCLayersError  # noqa: E402
from nclayers.jobs.folder import TRAIN_SUMMARY, RunFolder  # noqa: E402
from nclayers.jobs.report import ABOVE_CHANCE, FITS_NOISE, readability  # noqa: E402
from nclayers.jobs.sweep import Sweep, load_sweep  # noqa: E402
from nclayers.table import Table  # noqa: E402

PAPER = REPO / "configs" / "paper"
FITS_INPUTS = 0.9  # corrupted-input runs: final train accuracy on their training images
TIMING = "check_minis.json"
LOG = "check_minis.log"


def twins(only: str | None) -> list[Path]:
    """The twin sweep files in figure order, or those `--only` names (fig3 or
    fig3-cpu-mini)."""
    files = sorted(PAPER.glob("*-cpu-mini.yaml"), key=_figure_number)
    if not only:
        return files
    wanted = [w.strip().removesuffix(".yaml").removesuffix("-cpu-mini") for w in only.split(",")]
    by_name = {f.name.removesuffix("-cpu-mini.yaml"): f for f in files}
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        raise SystemExit(f"--only: no twin named {', '.join(unknown)}; "
                         f"twins: {', '.join(by_name)}")  # fmt: skip
    return [by_name[w] for w in wanted if w]


def _figure_number(path: Path) -> tuple:
    m = re.match(r"fig(\d+)", path.name)
    return (int(m.group(1)) if m else 10**6, path.name)


def figure_name(path: Path) -> str:
    return path.name.removesuffix("-cpu-mini.yaml")


# ----------------------------------------------------------------------------- running
def run_sweep(path: Path, overrides: list[str], threads: int | None, collect: bool) -> dict:
    """`nclayers sweep FILE -q` (or `--collect`) in a child process; its timing."""
    sweep = load_sweep(path, overrides)
    sweep.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "nclayers.cli", "sweep", str(path), "-q", *overrides]
    if collect:
        cmd.append("--collect")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(sweep.out / LOG, "a" if collect else "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    timing = {"wall_s": wall, "cpu_s": cpu, "rc": rc, "threads": threads,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "overrides": overrides}  # fmt: skip
    if not collect:  # a collect-only pass keeps the timing of the run that trained
        (sweep.out / TIMING).write_text(json.dumps(timing, indent=1))
    return timing


def earlier_timing(sweep: Sweep) -> dict:
    try:
        return json.loads((sweep.out / TIMING).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


# ----------------------------------------------------------------------------- judging
def judge(sweep: Sweep) -> list[dict]:
    """One record per run of the sweep: kind, accuracies, readable and why."""
    try:
        rows = list(Table.from_csv(sweep.out / "runs.csv"))
    except NCLayersError:
        rows = []
    by_index = {int(r["index"]): r for r in rows if r.get("index") is not None}
    return [judge_run(sweep, run, by_index.get(run.index) or {}) for run in sweep.runs]


def judge_run(sweep: Sweep, run, row: dict) -> dict:
    data = run.config.data
    kind = ("noisy" if has_label_noise(data.noise) else
            "corrupted" if data.corruption else "clean")  # fmt: skip
    folder = RunFolder(run.folder, write=False)
    rec = {"figure": figure_name(sweep.path), "run": _labels(run), "kind": kind,
           "id": run.id, "test_acc": None, "train_acc": None, "memorized": None,
           "work_s": 0.0, "why": []}  # fmt: skip
    try:
        train = folder.read_json(TRAIN_SUMMARY) or {}
        stages = folder.stages()
    except NCLayersError as err:
        train, stages = {}, {}
        rec["why"].append(str(err))
    final = train.get("final") or {}
    rec["test_acc"], rec["train_acc"] = final.get("test_acc"), final.get("train_acc")
    rec["memorized"] = (train.get("label_noise") or {}).get("memorized")
    rec["work_s"] = sum(float(stages.get(s, {}).get("seconds") or 0) for s in sweep.stages)
    for name in sweep.stages:
        state = str(row.get(name) or "missing")
        if state not in ("done", "n/a"):  # n/a: a clean baseline has no memorization ratio
            rec["why"].append(f"{name} {state}")
    rec["why"] += _rule(kind, rec, train)
    rec["report_notes"] = readability(run.config.to_dict(), train) if train else []
    rec["readable"] = not rec["why"]
    return rec


def _rule(kind: str, rec: dict, train: dict) -> list[str]:
    if not train:
        return ["not trained"]
    if kind == "noisy":
        m = rec["memorized"]
        return (
            []
            if m is not None and m >= FITS_NOISE
            else [f"fits {_pct(m)} of its changed labels (needs >= {FITS_NOISE:.0%})"]
        )
    if kind == "corrupted":
        a = rec["train_acc"]
        return (
            []
            if a is not None and a >= FITS_INPUTS
            else [f"train accuracy {_pct(a)} on its corrupted images (needs >= {FITS_INPUTS:.0%})"]
        )
    chance = 1.0 / (train.get("num_classes") or 10)
    a = rec["test_acc"]
    return (
        []
        if a is not None and a >= ABOVE_CHANCE * chance
        else [
            f"test accuracy {_pct(a)} "
            f"(needs >= {ABOVE_CHANCE:g} x chance = {ABOVE_CHANCE * chance:.0%})"
        ]
    )


def _labels(run) -> str:
    return ", ".join(f"{a}={lab}" for a, lab in run.labels.items()) or run.id


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _acc(x) -> str:
    return "  -  " if x is None else f"{x:.3f}"


def _clock(seconds) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s"


def line(rec: dict, timing: dict) -> str:
    mem = f"{rec['memorized']:.3f}" if rec["memorized"] is not None else "  -  "
    verdict = "yes" if rec["readable"] else "NO: " + "; ".join(rec["why"])
    extra = "" if not rec["report_notes"] or not rec["readable"] else (
        "  (report: " + " ".join(rec["report_notes"]) + ")")  # fmt: skip
    return (f"{rec['figure']:<6} {rec['run']:<44} {rec['kind']:<9} test {_acc(rec['test_acc'])}"
            f"  train {_acc(rec['train_acc'])}  memorized {mem}  work {_clock(rec['work_s']):>6}"
            f"  sweep {_clock(timing.get('wall_s')):>6} wall {_clock(timing.get('cpu_s')):>6} cpu"
            f"  readable: {verdict}{extra}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="settings for every run of every sweep, e.g. data.dir=DIR",
    )
    ap.add_argument("--only", help="comma-separated twins, e.g. fig3,fig4 (default: all)")
    ap.add_argument(
        "--collect",
        action="store_true",
        help="do not train: gather the finished runs (nclayers sweep --collect)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS for the sweeps (default: torch's own choice)",
    )
    ap.add_argument("--json", help="write every run's record and each sweep's timing here")
    args = ap.parse_args(argv)

    records, sweeps = [], {}
    for path in twins(args.only):
        sweep = load_sweep(path, args.overrides)
        timing = run_sweep(path, args.overrides, args.threads, args.collect)
        if args.collect or timing["rc"] != 0:
            timing = (
                {**earlier_timing(sweep), "collect_rc": timing["rc"]} if args.collect else timing
            )
        sweeps[figure_name(path)] = {"file": str(path.relative_to(REPO)), **timing}
        for rec in judge(sweep):
            records.append(rec)
            print(line(rec, timing), flush=True)
    bad = [r for r in records if not r["readable"]]
    wall = sum(s.get("wall_s") or 0 for s in sweeps.values())
    print(f"{len(records)} runs in {len(sweeps)} twins: {len(records) - len(bad)} readable, "
          f"{len(bad)} not; sweeps' wall time {_clock(wall)}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"sweeps": sweeps, "runs": records}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
