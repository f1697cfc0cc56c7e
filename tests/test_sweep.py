"""Sweeps: the file, run ids, every paper file validates, a real tiny sweep end to end
through all six stages (skip, resume, out-of-date stages, shared runs, failures recorded),
the local executor, and labels that are text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from nclayers.cli import main
from nclayers.config import load_config
from nclayers.jobs.folder import RunFolder
from nclayers.jobs.launch import run_sweep
from nclayers.jobs.sweep import load_sweep, run_id, run_one, stage_jobs
from nclayers.jobs.train import train_job
from nclayers.table import Table

pytestmark = pytest.mark.usefixtures("one_thread")

PAPER = sorted((Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.yaml"))
TINY = {
    "data.name": "digits", "data.train_subset": 100, "data.test_subset": 100,
    "model.name": "resnet18", "model.width": 4, "train.epochs": 2, "train.batch_size": 50,
    "train.lr": 0.05, "train.schedule": "constant", "train.augment": False,
    "train.checkpoint_every": 1, "train.tensorboard": False, "device": "cpu",
    "analyze.batch_size": 100, "probe.epochs": 1, "probe.milestones": [], "probe.augment": False,
    "prune.seeds": [0], "prune.baselines": ["last"],
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
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
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
    assert r.folder == tmp_path / "root" / "runs" / r.id and r.config.run == r.id
    # The id follows what defines the weights, not where a run lives or how it is measured
    # (14.9: measuring in float32 through a sweep does not retrain in a new folder).
    cfg = load_config(None, ["train.epochs=3"])
    same = load_config(None, ["train.epochs=3", "device=cpu", "data.dir=/elsewhere", "run=name",
                              "train.checkpoint_every=7", "analyze.amp=false", "probe.amp=false",
                              "analyze.channels_last=false", "probe.epochs=3",
                              "data.test_subset=50"])  # fmt: skip
    assert run_id(cfg) == run_id(same)
    assert run_id(cfg) != run_id(load_config(None, ["train.epochs=4"]))
    assert run_id(cfg) != run_id(load_config(None, ["train.epochs=3", "train.amp=false"]))
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
        ({"stages": ["train", "fly"]}, "stages.1"),
        ({"axes": {"noise": [{"label": "a", "data.nois": 1}]}}, "data.nois"),
        ({"axes": {"noise": [0.1, 0.2]}}, "name the axis after the config key"),
        ({"axes": {"noise": [{"label": "a", "data.noise": 0.1},
                             {"label": "a", "data.noise": 0.2}]}}, "repeated labels"),
        ({"axes": {"data.noise": [0.1, 0.1]}}, "repeated labels"),
        ({"axes": {"noise": [{"label": "a", "train.seed": 1}, {"label": "b", "train.seed": 1}]}},
         "resolve to the same run and settings"),
        ({"figure": {"layout": "noisy", "rows": "model"}}, "is not an axis"),
        ({"figure": {"layout": "fancy"}}, "figure layout"),
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"base": "missing.yaml"}, "does not exist"),
        ({"config": {"train.epochs": "many"}}, r"train\.epochs='many'.*tiny\.yaml, line"),
        ({"slurm": {"partiton": "gpu"}}, "slurm.partiton"),
    ],
)  # fmt: skip
def test_bad_files_fail_with_the_key_and_the_fix(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        load_sweep(write_sweep(tmp_path, **spec))


def test_malformed_sweep_yaml_names_the_file_and_line(tmp_path, capsys):
    """17.9: a YAML error names the file and the line, as one line from the CLI."""
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nstages: [train\n")
    assert main(["sweep", str(path), "--print"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: line 3: not valid YAML" in err and "Traceback" not in err


def test_base_may_be_files_or_a_mapping(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 7\nmodel:\n  width: 2\n")
    (tmp_path / "more.yaml").write_text("train.lr: 0.3\n")
    sweep = load_sweep(write_sweep(tmp_path, base="base.yaml", config={}))
    assert sweep.runs[0].config.train.epochs == 7
    both = load_sweep(write_sweep(tmp_path, base=["base.yaml", "more.yaml"], config={}))
    assert (both.runs[0].config.train.epochs, both.runs[0].config.train.lr) == (7, 0.3)
    mapped = load_sweep(write_sweep(tmp_path, base={"train": {"epochs": 5}}, config={}))
    assert mapped.runs[0].config.train.epochs == 5


@pytest.mark.parametrize("path", PAPER, ids=[p.name for p in PAPER])
def test_every_paper_sweep_file_validates(path, capsys):
    assert main(["sweep", str(path), "--print"]) == 0, capsys.readouterr().err
    lines = capsys.readouterr().out.splitlines()
    sweep = load_sweep(path)
    assert len(lines) == len(sweep.runs) >= 1
    assert all(line.endswith(f"--index {i}") for i, line in enumerate(lines))
    assert all(set(sweep.stages) <= set(stage_jobs()) for _ in sweep.runs)


IMAGENET = [p for p in PAPER if p.stem.endswith("-imagenet")]


@pytest.mark.parametrize("path", IMAGENET, ids=[p.name for p in IMAGENET])
def test_imagenet_panels_measure_pretrained_weights_and_have_a_cpu_mini_twin(path):
    """The paper's ImageNet panels: pretrained files named (with their URL) in the header,
    A.1's probe, NCC means from 100 training images per class; each panel's -cpu-mini
    twin trains the same model family on the generated folder that its header makes."""
    sweep, text = load_sweep(path), path.read_text()
    assert "train" not in sweep.stages and "analyze" in sweep.stages
    for run in sweep.runs:
        cfg = run.config
        assert (cfg.data.name, cfg.data.image_size, cfg.data.resize) == ("imagenet", 224, 256)
        assert cfg.model.name.endswith("_in1k") and cfg.model.width is None
        name = Path(cfg.model.checkpoint).name
        assert cfg.model.checkpoint == f"weights/{name}"
        assert "https://download.openmmlab.com/mmclassification/v0/" in text
        assert f"/{name}\n" in text  # where the file comes from
        assert (cfg.analyze.split, cfg.analyze.reference) == ("test", "train")
        assert cfg.analyze.reference_subset == 100_000
        pc = cfg.probe
        assert (pc.epochs, pc.lrs, pc.milestones, pc.gamma, pc.augment, pc.mode) == (
            10, [0.1], [5, 7], 0.2, True, "stream")  # fmt: skip
        assert not pc.standardize
    twin = path.with_name(f"{path.stem}-cpu-mini.yaml")
    mini = load_sweep(twin)
    assert mini.stages[0] == "train" and set(sweep.stages) <= set(mini.stages)
    assert [r.config.model.name for r in mini.runs] == [r.config.model.name for r in sweep.runs]
    assert mini.figures == sweep.figures
    folder = mini.runs[0].config.data.dir
    command = rf"^#   nclayers make-folder {re.escape(folder)}(\s|$)"
    assert re.search(command, twin.read_text(), re.MULTILINE), command
    assert {r.config.data.dir for r in mini.runs} == {folder}


def test_all_six_stages_through_one_tiny_sweep(tmp_path, capsys):
    """14.1: train, analyze, probe, memorization, prune and equality, each the plain job of
    its verb, through one sweep (equality crashed on the whole Config it was given)."""
    axis = [{"label": "r=20%", "data.noise": 0.2}, {"label": "r=40%", "data.noise": 0.4}]
    path = write_sweep(tmp_path, axes={"noise": axis}, stages=[
        "train", "analyze", "probe", "memorization", "prune", "equality"])  # fmt: skip
    sweep = load_sweep(path)
    summary = run_sweep(sweep, progress=False)
    assert summary["stages"] == {f"{s} done": 2 for s in sweep.stages}, capsys.readouterr().err
    for run in sweep.runs:
        folder = RunFolder(run.folder)
        assert all(folder.status(s, run.config) == "done" for s in sweep.stages)
        for name in ("probe.csv", "memorization.csv", "prune.csv", "equality.csv",
                     "equality.json"):  # fmt: skip
            assert folder.exists(name), name
    runs = Table.from_csv(sweep.out / "runs.csv")
    assert all(r[s] == "done" for r in runs for s in sweep.stages)
    assert Table.from_csv(sweep.out / "probe.csv") and (sweep.out / "report.html").is_file()


def test_a_tiny_sweep_end_to_end(tmp_path, capsys):
    path = write_sweep(tmp_path, stages=["train", "analyze", "probe"])
    sweep = load_sweep(path)
    clean, noisy = sweep.runs
    # An interrupted training (1 of 2 epochs, checkpointed): the sweep resumes it.
    train_job(noisy.config, noisy.folder, stop_after=1, progress=False)
    assert RunFolder(noisy.folder).status("train", noisy.config) == "missing"
    summary = run_sweep(sweep, progress=False)
    out = sweep.out
    log = (noisy.folder / "train.log").read_text()
    assert "epochs 1..1 of 2" in log and "epochs 2..2 of 2" in log  # resumed, not restarted
    runs = Table.from_csv(out / "runs.csv")
    assert [r["noise"] for r in runs] == ["r=0%", "r=40%"]
    assert all(r[s] == "done" for r in runs for s in ("train", "analyze", "probe"))
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
    # 17.12: two epochs fit few of the changed labels: runs.csv, the report and the
    # figure's caption say that Δ cannot be read.
    assert "Δ not interpretable: the model fits" in runs[1]["notes"]
    assert f"noise=r=40%: {runs[1]['notes']}" in summary["notes"]
    html = (out / "report.html").read_text()
    assert "Δ not interpretable" in html
    assert "r=40%" in html and "data:image/png;base64," in html
    info = json.loads((out / "sweep.json").read_text())
    assert [r["id"] for r in info["runs"]] == [clean.id, noisy.id]
    assert info["summary"]["files"]["figures"] == summary["files"]["figures"]

    # Run again: every stage that is done and up to date is skipped.
    mtime = (clean.folder / "checkpoint.pt").stat().st_mtime_ns
    status = run_one(sweep, 0, progress=False)
    assert status["stages"]["train"] == {"status": "done", "skipped": True}
    assert (clean.folder / "checkpoint.pt").stat().st_mtime_ns == mtime

    # 17.4: more training of a run makes its measurements out of date; runs.csv says so and
    # the sweep redoes them.
    assert main(["train", str(clean.folder), "--resume", "train.epochs=3", "-q"]) == 0
    assert main(["sweep", str(path), "--collect", "-q"]) == 0
    row = Table.from_csv(out / "runs.csv")[0]
    assert row["analyze"].startswith("out of date: the weights changed")
    assert row["train"].startswith("out of date: settings changed (train.epochs)")
    # Measured with other settings, a stage is redone (and the run is not retrained).
    again = load_sweep(path, ["analyze.classic_nc1=true"])
    assert [r.id for r in again.runs] == [r.id for r in sweep.runs]
    status = run_one(again, 1, progress=False)["stages"]
    assert status["train"].get("skipped") and not status["analyze"].get("skipped")
    assert status["analyze"]["was"] == "out of date: settings changed (analyze.classic_nc1)"
    assert all(r.get("nc1_classic") for r in RunFolder(noisy.folder).layers())

    # A second sweep holding the same run shares its folder and its work.
    axis = [{"label": "clean", "data.noise": 0.0}, {"label": "r=20%", "data.noise": 0.2}]
    other = load_sweep(write_sweep(tmp_path, name="other", axes={"noise": axis}))
    assert other.runs[0].folder == noisy.folder.parent / clean.id

    # The CLI: --index runs one entry; report and plot verbs.
    assert main(["sweep", str(path), "--index", "1", "-q"]) == 0
    assert main(["plot", str(out), "--layout", "clean", "--curves", "noise"]) == 0
    assert (out / "clean.png").is_file()
    assert main(["report", str(path)]) == 0
    assert main(["sweep", str(path), "--index", "5"]) == 2
    assert "--index 5" in capsys.readouterr().err


def test_failed_stages_are_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    """A user error is recorded in one line and blocks the stages that need it; the other
    runs go on; the exit status says so."""
    axis = [
        {"label": "ok", "train.seed": 0},
        {"label": "bad", "train.seed": 1, "model.checkpoint": str(tmp_path / "nope.pt")},
    ]
    path = write_sweep(tmp_path, axes={"case": axis}, stages=["analyze", "equality"],
                       figure=None)  # fmt: skip
    sweep = load_sweep(path)
    train_job(sweep.runs[0].config, sweep.runs[0].folder, progress=False)
    assert main(["sweep", str(path), "-q"]) == 1
    runs = Table.from_csv(sweep.out / "runs.csv")
    assert runs[0]["analyze"] == "done" and runs[0]["equality"] == "done"
    assert runs[1]["analyze"] == "failed" and runs[1]["equality"] == "blocked"
    assert "model.checkpoint=" in runs[1]["errors"] and "no such file" in runs[1]["errors"]
    assert "Traceback" not in capsys.readouterr().err


def test_a_clean_baseline_has_no_memorization_stage_to_fail(tmp_path, capsys):
    """A corrupted-inputs or label-noise figure has a clean baseline run; its memorization
    stage (nothing to compare) was recorded as failed, and the sweep exited 1 on a
    complete figure. It is "n/a" now; the noisy run's is measured."""
    path = write_sweep(tmp_path, stages=["train", "memorization"], figure=None)
    sweep = load_sweep(path)
    assert main(["sweep", str(path), "-q"]) == 0, capsys.readouterr().err
    assert "memorization" not in capsys.readouterr().err  # n/a is not a warning
    runs = Table.from_csv(sweep.out / "runs.csv")
    assert [r["memorization"] for r in runs] == ["n/a", "done"]
    assert not runs[0].get("errors")
    assert RunFolder(sweep.runs[1].folder).exists("memorization.csv")
    assert main(["sweep", str(path), "--index", "0", "-q"]) == 0


def test_a_stage_without_weights_is_refused_in_a_sweep(tmp_path):
    """17.2: a sweep with stages [analyze] on a run that was never trained records the
    refusal instead of measuring a random model."""
    path = write_sweep(tmp_path, stages=["analyze"], figure=None)
    sweep = load_sweep(path)
    status = run_one(sweep, 0, progress=False)
    assert status["stages"]["analyze"]["status"] == "failed"
    assert "no trained weights" in status["stages"]["analyze"]["error"]
    assert not (sweep.runs[0].folder / "layers.csv").exists()


def test_dollar_signs_in_labels_cost_nothing(tmp_path):
    """17.10: a `$` in the title or a label is text: the figure and the report are written."""
    axis = [
        {"label": "cost $\\alpha_$", "data.noise": 0.0},
        {"label": "$5 and $", "data.noise": 0.4},
    ]
    path = write_sweep(tmp_path, axes={"noise": axis}, title="cost $\\alpha_$ (a $ sign)")
    summary = run_sweep(load_sweep(path), progress=False)
    assert summary["figure_errors"] == []
    assert all(Path(p).stat().st_size > 0 for p in summary["files"]["figures"])
    assert "$5 and $" in (tmp_path / "root" / "tiny" / "report.html").read_text()


def test_local_executor_runs_the_tiny_sweep(tmp_path):
    """One process per run through submitit's local executor (the `--gpus` launcher);
    on this CPU machine the runs use device=cpu."""
    path = write_sweep(tmp_path, stages=["train", "analyze"], report=False)
    sweep = load_sweep(path)
    summary = run_sweep(sweep, gpus=[0, 1], progress=False)
    assert summary["stages"] == {"train done": 2, "analyze done": 2}
    for run in sweep.runs:
        status = json.loads(next((sweep.out / "status").glob(f"*-{run.id}.json")).read_text())
        assert status["stages"]["train"]["status"] == "done"
        assert RunFolder(run.folder).status("analyze", run.config) == "done"
    assert len(list((sweep.out / "local").glob("*/*_log.out"))) == 2
