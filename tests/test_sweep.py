"""Sweeps: the file, run ids, every paper file validates, a real tiny sweep end to end
(skip, resume, a stage that has not landed, shared runs, the GPU pool's dispatch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nclayers.cli import main
from nclayers.config import load_config
from nclayers.jobs.folder import RunFolder
from nclayers.jobs.sweep import STAGES, load_sweep, run_id, run_one, run_sweep
from nclayers.jobs.train import train_run
from nclayers.table import Table

PAPER = sorted((Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.yaml"))
TINY = {
    "data.name": "digits", "data.train_subset": 100, "data.test_subset": 100,
    "model.name": "resnet18", "model.width": 4, "train.epochs": 2, "train.batch_size": 50,
    "train.lr": 0.05, "train.schedule": "constant", "train.augment": False,
    "train.checkpoint_every": 1, "train.tensorboard": False, "device": "cpu",
    "analyze.batch_size": 100, "probe.epochs": 1, "probe.milestones": [], "probe.augment": False,
}  # fmt: skip


def write_sweep(tmp_path: Path, name: str = "tiny", **spec) -> Path:
    doc = {
        "name": name,
        "root": str(tmp_path / "root"),
        "config": TINY,
        "axes": {"noise": [{"label": "r=0%", "data.noise": 0.0},
                           {"label": "r=40%", "data.noise": 0.4}]},
        "stages": ["train", "analyze"],
        "figure": {"layout": "noisy", "curves": "noise"},
    }  # fmt: skip
    doc.update(spec)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_grid_ids_and_settings(tmp_path):
    path = write_sweep(tmp_path, figure=None, axes={
        "model": [{"label": "w4", "model.width": 4}, {"label": "w8", "model.width": 8}],
        "train.seed": [0, 1, 2],
    })  # fmt: skip
    sweep = load_sweep(path)
    assert len(sweep.runs) == 6
    assert [r.labels for r in sweep.runs[:4]] == [
        {"model": "w4", "train.seed": "0"}, {"model": "w4", "train.seed": "1"},
        {"model": "w4", "train.seed": "2"}, {"model": "w8", "train.seed": "0"},
    ]  # fmt: skip
    r = sweep.runs[4]
    assert (r.config.model.width, r.config.train.seed, r.config.data.name) == (8, 1, "digits")
    assert len({x.id for x in sweep.runs}) == 6
    assert r.folder == tmp_path / "root" / "runs" / r.id and r.config.out == str(r.folder)
    # The id follows what changes results, not where a run lives or runs.
    cfg = load_config(None, ["train.epochs=3"])
    same = load_config(None, ["train.epochs=3", "out=x", "device=cpu", "data.dir=/elsewhere",
                              "run=name", "train.checkpoint_every=7"])  # fmt: skip
    assert run_id(cfg) == run_id(same)
    assert run_id(cfg) != run_id(load_config(None, ["train.epochs=4"]))
    assert run_id(cfg) == run_id(load_config(None, ["train.epochs=3", "data.noise=0.0"]))
    # Only what differs from the defaults counts: a default spelled out changes nothing.
    assert run_id(cfg) == run_id(load_config(None, ["train.epochs=3", "train.lr=0.1"]))
    assert run_id(cfg) != run_id(load_config(None, ["train.epochs=3", "data.noise=0.1"]))
    assert run_id(cfg) != run_id(load_config(None, ["train.epochs=3", "model.options.x=1"]))
    # Command-line overrides reach every run (and change the ids).
    other = load_sweep(path, ["train.lr=0.01"])
    assert all(x.config.train.lr == 0.01 for x in other.runs)
    assert {x.id for x in other.runs}.isdisjoint(x.id for x in sweep.runs)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"stages": ["train", "fly"]}, "unknown stages"),
        ({"axes": {"noise": [{"label": "a", "data.nois": 1}]}}, "data.nois"),
        ({"axes": {"noise": [0.1, 0.2]}}, "name the axis after the config key"),
        ({"axes": {"noise": [{"label": "a", "data.noise": 0.1},
                             {"label": "a", "data.noise": 0.2}]}}, "repeated labels"),
        ({"axes": {"data.noise": [0.1, 0.1]}}, "repeated labels"),
        ({"axes": {"noise": [{"label": "a", "train.seed": 1}, {"label": "b", "train.seed": 1}]}},
         "resolve to the same config"),
        ({"figure": {"layout": "noisy", "rows": "model"}}, "is not an axis"),
        ({"figure": {"layout": "fancy"}}, "figure layout"),
        ({"colour": "red"}, "unknown keys"),
        ({"base": "missing.yaml"}, "does not exist"),
        ({"config": {"train.epochs": "many"}}, "train.epochs"),
    ],
)  # fmt: skip
def test_bad_files_fail_with_the_key_and_the_fix(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        load_sweep(write_sweep(tmp_path, **spec))


def test_base_may_be_a_file_or_a_mapping(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 7\nmodel:\n  width: 2\n")
    assert (
        load_sweep(write_sweep(tmp_path, base="base.yaml", config={})).runs[0].config.train.epochs
        == 7
    )
    mapped = load_sweep(write_sweep(tmp_path, base={"train": {"epochs": 5}}, config={}))
    assert mapped.runs[0].config.train.epochs == 5


@pytest.mark.parametrize("path", PAPER, ids=[p.name for p in PAPER])
def test_every_paper_sweep_file_validates(path, capsys):
    assert main(["sweep", str(path), "--print"]) == 0, capsys.readouterr().err
    lines = capsys.readouterr().out.splitlines()
    sweep = load_sweep(path)
    assert len(lines) == len(sweep.runs) >= 1
    assert all(line.endswith(f"--index {i}") for i, line in enumerate(lines))


def test_a_tiny_sweep_end_to_end(tmp_path, capsys):
    path = write_sweep(tmp_path, stages=["train", "analyze", "probe"])
    sweep = load_sweep(path)
    clean, noisy = sweep.runs
    # An interrupted training (1 of 2 epochs, checkpointed): the sweep resumes it.
    train_run(noisy.config, stop_after=1, progress=False)
    assert not RunFolder(noisy.folder).done("train")
    probe_missing = not _available("probe")

    summary = run_sweep(sweep, progress=False)
    out = sweep.out
    log = (noisy.folder / "train.log").read_text()
    assert "epochs 1..1 of 2" in log and "epochs 2..2 of 2" in log  # resumed, not restarted
    for run in sweep.runs:
        assert RunFolder(run.folder).done("train") and RunFolder(run.folder).done("analyze")
    runs = Table.from_csv(out / "runs.csv")
    assert [r["noise"] for r in runs] == ["r=0%", "r=40%"]
    assert all(r["train"] == "done" and r["analyze"] == "done" for r in runs)
    if probe_missing:  # recorded with the reason; the sweep went on
        assert all(r["probe"] == "failed" and "not available" in r["errors"] for r in runs)
    layers = Table.from_csv(out / "layers.csv")
    assert {r["run"] for r in layers} == {clean.id, noisy.id}
    assert {r["noise"] for r in layers.where(run=noisy.id)} == {"r=40%"}
    memo = Table.from_csv(out / "memorization.csv")
    assert {r["run"] for r in memo} == {noisy.id} and len(memo) == 8  # ResNet18: 8 blocks
    train_rows = layers.where(run=noisy.id, split="train")
    for m in memo:
        c = next(r for r in train_rows if r["view"] == "clean" and r["layer"] == m["layer"])
        n = next(r for r in train_rows if r["view"] == "noisy" and r["layer"] == m["layer"])
        assert m["ratio"] == pytest.approx(c["nc1"] / n["nc1"])
    assert (out / "tiny.png").is_file() and (out / "tiny.pdf").is_file()
    html = (out / "report.html").read_text()
    assert "r=40%" in html and "data:image/png;base64," in html
    info = json.loads((out / "sweep.json").read_text())
    assert [r["id"] for r in info["runs"]] == [clean.id, noisy.id]
    assert info["summary"]["files"]["figures"] == summary["files"]["figures"]

    # Run again: every finished stage is skipped; the tables are gathered again.
    mtime = (clean.folder / "checkpoint.pt").stat().st_mtime_ns
    status = run_one(sweep, 0, progress=False)
    assert status["stages"]["train"] == {"status": "done", "skipped": True}
    assert (clean.folder / "checkpoint.pt").stat().st_mtime_ns == mtime

    # A second sweep holding the same run shares its folder and its work.
    axis = [{"label": "clean", "data.noise": 0.0}, {"label": "r=20%", "data.noise": 0.2}]
    other = load_sweep(write_sweep(tmp_path, name="other", axes={"noise": axis}))
    assert other.runs[0].folder == clean.folder
    assert run_one(other, 0, progress=False)["stages"]["analyze"]["skipped"] is True

    # The CLI: --collect only gathers; --index runs one entry; report and plot verbs.
    assert main(["sweep", str(path), "--collect", "-q"]) == (1 if probe_missing else 0)
    assert main(["sweep", str(path), "--index", "0", "-q"]) == (1 if probe_missing else 0)
    assert main(["plot", str(out), "--layout", "clean", "--curves", "noise"]) == 0
    assert (out / "clean.png").is_file()
    assert main(["report", str(path)]) == 0
    assert main(["sweep", str(path), "--index", "5"]) == 2
    assert "--index 5" in capsys.readouterr().err


def test_gpu_pool_dispatches_one_subprocess_per_run(tmp_path):
    # Runs whose stages are all finished: the children only check and record, so the
    # pool's dispatch, logs and status files are tested without a GPU.
    path = write_sweep(tmp_path, stages=["train"], figure=None, report=False)
    sweep = load_sweep(path)
    for run in sweep.runs:
        RunFolder(run.folder).mark_done("train")
    run_sweep(sweep, gpus=["0", "1"], progress=False)
    for run in sweep.runs:
        status = json.loads(next((sweep.out / "status").glob(f"*-{run.id}.json")).read_text())
        assert status["stages"]["train"] == {"status": "done", "skipped": True}
    assert len(list((sweep.out / "logs").glob("*.log"))) == 2


def _available(stage: str) -> bool:
    from nclayers.jobs.sweep import stage_available

    return stage in STAGES and stage_available(stage)
