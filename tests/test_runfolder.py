"""Run folders that never lie: stages, layers.csv ownership, weights, refusals.

Each test here names the defect it guards against (issue items "14.n" for the jobs
contract, "17.n" for run-folder integrity); each fails on the code before its fix.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from nclayers.cli import main
from nclayers.config import load_config
from nclayers.jobs import RunFolder, analyze_job, load_model, train_job
from nclayers.jobs.folder import CHECKPOINT, CONFIG, LAYERS, SUMMARY, TRAIN_SUMMARY
from nclayers.table import Table

pytestmark = pytest.mark.usefixtures("one_thread")

S = ["data.name=digits", "model.width=8", "data.train_subset=200", "data.test_subset=100",
     "device=cpu", "train.tensorboard=false", "-q"]  # fmt: skip
TINY = [
    "data.name=digits", "data.train_subset=100", "data.test_subset=100", "model.width=4",
    "train.epochs=1", "train.batch_size=50", "train.checkpoint_every=0", "device=cpu",
    "analyze.batch_size=100", "train.tensorboard=false", "probe.epochs=1", "probe.augment=false",
    "probe.milestones=[]",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One trained tiny run; tests copy it before changing anything."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("trained") / "run"
    train_job(load_config(None, TINY), out, progress=False)
    return out


def copy_of(run, tmp_path, name="run"):
    import shutil

    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


# ----------------------------------------------------------------------------- stages
def test_stages_record_weights_and_settings_and_go_out_of_date(trained, tmp_path):
    """17.4: a stage records the weights it measured; more training makes it out of date."""
    run = copy_of(trained, tmp_path)
    folder = RunFolder(run)
    cfg = folder.config()
    assert folder.status("train", cfg) == "done"
    assert folder.status("analyze", cfg) == "missing"
    analyze_job(cfg, folder, progress=False)
    assert folder.status("analyze", cfg) == "done"
    weights = folder.stages()["analyze"]["weights"]
    assert weights["sha256"] == folder.checkpoint_sha() and weights["epoch"] == 1
    # Other measurement settings: out of date, saying which.
    other = cfg.updated({"analyze.reference": None})
    assert folder.status("analyze", other).startswith("out of date: settings changed")
    assert "analyze.reference" in folder.status("analyze", other)
    # Train further: every stage measured on the old weights is out of date.
    assert main(["train", str(run), "--resume", "train.epochs=2", "-q"]) == 0
    cfg2 = folder.config()
    assert cfg2.train.epochs == 2 and folder.status("train", cfg2) == "done"
    assert (
        folder.status("analyze", cfg2) == "out of date: the weights changed (epoch 1 then, 2 now)"
    )
    # The report says so.
    assert main(["report", str(run)]) == 0
    assert "out of date: the weights changed" in (run / "report.html").read_text()


def test_layers_csv_has_one_row_per_key_the_readme_workflow(tmp_path):
    """17.1: train, analyze, analyze, probe on an unnamed run leaves 16 rows (+ header):
    a rerun replaced its rows, and probe_acc filled the analysis rows."""
    r = str(tmp_path / "r")
    assert main(["train", *S, "train.epochs=1", "--out", r]) == 0
    assert main(["analyze", r, "-q"]) == 0
    assert main(["analyze", r, "-q"]) == 0
    assert main(["probe", r, "probe.epochs=1", "-q"]) == 0
    lines = (tmp_path / "r" / LAYERS).read_text().splitlines()
    assert len(lines) == 17
    table = Table.from_csv(tmp_path / "r" / LAYERS)
    assert {row["run"] for row in table} == {""}
    test = table.where(split="test", view="clean")
    assert len(test) == 8 and all(row["nc1"] > 0 and row["probe_acc"] is not None for row in test)


def test_a_stage_run_again_replaces_its_columns(tmp_path):
    """14.4: re-analysing without a reference clears the old ncc_acc instead of keeping it
    in rows measured by the new analysis; the probe's column stays."""
    folder = RunFolder(tmp_path)
    rows = [{"run": "", "split": "test", "view": "clean", "layer": i, "block": f"b{i}", "dim": 4,
             "nc1": 10.0 / i, "ncc_acc": 0.5} for i in (1, 2)]  # fmt: skip
    folder.merge_layers("analyze", rows)
    folder.merge_layers("probe", [{**r, "probe_acc": 0.9} for r in rows])
    again = [{k: v for k, v in r.items() if k != "ncc_acc"} | {"ncc_acc": None, "nc1": 1.0}
             for r in rows]  # fmt: skip
    table = folder.merge_layers("analyze", again)
    assert [r["ncc_acc"] for r in table] == [None, None]
    assert [r["nc1"] for r in table] == [1.0, 1.0]
    assert [r["probe_acc"] for r in table] == [0.9, 0.9]
    # A stage's rows that are not measured again go; other stages' values stay.
    table = folder.merge_layers("analyze", again[:1])
    assert [r["layer"] for r in table] == [1, 2] and table[1].get("nc1") is None
    assert table[1]["probe_acc"] == 0.9


def test_reanalysis_with_reference_null_clears_ncc(trained, tmp_path):
    """14.4 end to end."""
    run = str(copy_of(trained, tmp_path))
    assert main(["analyze", run, "-q"]) == 0
    test = Table.from_csv(f"{run}/{LAYERS}").where(split="test")
    assert len(test) == 8 and all(r["ncc_acc"] is not None for r in test)
    assert main(["analyze", run, "analyze.reference=null", "-q"]) == 0
    rows = Table.from_csv(f"{run}/{LAYERS}")
    assert len(rows) == 8 and all(r["ncc_acc"] is None for r in rows)


# ----------------------------------------------------------------------------- weights
def test_no_trained_weights_is_refused(trained, tmp_path, capsys):
    """17.2: without checkpoint.pt (deleted, or train killed before its first checkpoint)
    analyze refuses and names the fix, instead of measuring a random model."""
    run = copy_of(trained, tmp_path)
    (run / CHECKPOINT).unlink()
    assert main(["analyze", str(run), "-q"]) == 2
    err = capsys.readouterr().err
    assert "has no trained weights" in err and "nclayers train" in err and "model.untrained" in err
    assert not (run / LAYERS).exists() and "analyze" not in RunFolder(run).stages()
    # On purpose, the initialisation can be measured.
    assert main(["analyze", str(run), "model.untrained=true", "-q"]) == 0


def test_run_folder_config_and_checkpoint_give_the_trained_model(trained):
    folder = RunFolder(trained)
    cfg = folder.config()
    model = load_model(cfg, folder, 10)
    saved = torch.load(trained / CHECKPOINT, weights_only=True)["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_out_is_where_results_go_even_for_a_run_folder(trained, tmp_path):
    """14.3: `analyze RUN --out OTHER` reads RUN's weights and writes only to OTHER."""
    run = copy_of(trained, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    other = tmp_path / "other"
    assert main(["analyze", str(run), "--out", str(other), "-q"]) == 0
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before  # the run folder is untouched
    assert (other / LAYERS).is_file() and (other / CONFIG).is_file()
    saved = yaml.safe_load((other / CONFIG).read_text())
    assert saved["model"]["checkpoint"] == str(run / CHECKPOINT)
    # Same numbers as measuring in place.
    assert main(["analyze", str(run), "-q"]) == 0
    key = [(r["split"], r["layer"], r["nc1"]) for r in Table.from_csv(run / LAYERS)]
    assert key == [(r["split"], r["layer"], r["nc1"]) for r in Table.from_csv(other / LAYERS)]
    # --out a file is refused, not a traceback.
    (tmp_path / "file").write_text("x")
    assert main(["analyze", str(run), "--out", str(tmp_path / "file"), "-q"]) == 2


def test_overrides_never_become_the_runs_settings(trained, tmp_path, capsys):
    """17.3: a probe with overrides (failing or not) leaves config.yaml as it was."""
    run = copy_of(trained, tmp_path)
    config = (run / CONFIG).read_bytes()
    assert main(["probe", str(run), "data.test_subset=30", "probe.mode=foo", "-q"]) == 2
    assert "probe.mode='foo'" in capsys.readouterr().err
    assert (run / CONFIG).read_bytes() == config
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"x": torch.zeros(1)}}, bad)
    assert main(["probe", str(run), "data.test_subset=30", f"model.checkpoint={bad}", "-q"]) == 2
    assert (run / CONFIG).read_bytes() == config
    assert main(["probe", str(run), "data.test_subset=30", "-q"]) == 0
    assert (run / CONFIG).read_bytes() == config
    assert RunFolder(run).read_json(SUMMARY)["probe"]["test_samples"] == 30
    assert main(["analyze", str(run), "-q"]) == 0  # measures the run's own 100 test images
    assert RunFolder(run).read_json(SUMMARY)["analyze"]["samples"]["test"] == 100


def test_another_runs_folder_is_refused(trained, tmp_path, capsys):
    run = copy_of(trained, tmp_path)
    assert main(["analyze", *TINY, "model.width=8", "--out", str(run), "-q"]) == 2
    assert "holds another run (model.width: 4 here, 8 asked)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- training
def test_clean_labels_spelled_any_way_are_one_run(trained, tmp_path):
    """Sweep files sharing a clean run, one saying data.noise: 0.0, another leaving it
    out, have one run id; the second's train stage failed ('holds a run with other
    settings (data.noise)') and blocked every stage after it. Records written with 0.0
    still read as done."""
    from nclayers.jobs.folder import STAGES
    from nclayers.jobs.sweep import run_id

    folder = RunFolder(copy_of(trained, tmp_path))
    for recorded in (None, 0.0):  # 0.0: as an older run recorded it
        stages = folder.read_json(STAGES)
        stages["train"]["settings"]["data.noise"] = recorded
        folder.write_json(STAGES, stages)
        for spelling in ("data.noise=0.0", "data.noise=clean", "data.noise=null"):
            cfg = load_config(None, [*TINY, spelling])
            assert cfg.data.noise is None and run_id(cfg) == run_id(load_config(None, TINY))
            # done: the sweep skips it (out of date, it trained and failed)
            assert folder.status("train", cfg) == "done", (recorded, spelling)


def test_train_never_retrains_a_run_silently(trained, tmp_path, capsys):
    """17.5: `train RUN` without --resume or --force refuses, saying what the folder holds."""
    run = copy_of(trained, tmp_path)
    weights = (run / CHECKPOINT).read_bytes()
    assert main(["train", str(run), "-q"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run (1 epochs)" in err and "--resume" in err and "--force" in err
    assert (run / CHECKPOINT).read_bytes() == weights
    assert main(["train", str(run), "--force", "train.seed=1", "-q"]) == 0
    assert (run / CHECKPOINT).read_bytes() != weights


def test_training_that_diverges_stops_and_is_not_done(tmp_path, capsys):
    """17.6: a non-finite loss stops training with a message; train is not marked done,
    and every JSON file stays strict (no bare NaN)."""
    run = tmp_path / "run"
    assert main(["train", *S, "train.epochs=3", "train.lr=1e6", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "training diverged at epoch" in err and "lower train.lr" in err
    assert "train" not in RunFolder(run).stages()

    def strict(constant):
        raise AssertionError(f"bare {constant} in a JSON file")

    for path in run.glob("*.json"):
        json.loads(path.read_text(), parse_constant=strict)
    assert main(["analyze", str(run), "-q"]) == 2  # nothing trained to measure


def test_train_summary_reports_the_noise_rate_and_the_memorized_fraction(tmp_path):
    from nclayers.data import load_dataset
    from nclayers.memorization import memorized_fraction

    cfg = load_config(None, [*TINY, "data.noise=0.5", "train.epochs=2"])
    result = train_job(cfg, tmp_path, progress=False)
    noise = RunFolder(tmp_path).read_json(TRAIN_SUMMARY)["label_noise"]
    ds = load_dataset(cfg.data, "train")
    changed = int((ds.labels["clean"] != ds.labels["noisy"]).sum())
    assert noise["changed"] == changed and noise["rate"] == changed / len(ds)
    assert noise["source"] == "shuffle:0.5"
    expected = memorized_fraction(result.model, ds)
    assert noise["memorized"] == expected["memorized"]


def test_analysis_same_split_reference_uses_the_measured_autocast(trained, tmp_path, monkeypatch):
    """14.7: with analyze.reference equal to analyze.split, both passes run under
    analyze.amp (the first pass used autocast whatever train.amp said)."""
    import nclayers.analysis as analysis

    seen = []
    real = analysis.autocast
    monkeypatch.setattr(analysis, "autocast", lambda device, amp: seen.append(amp) or real(
        device, amp))  # fmt: skip
    folder = RunFolder(copy_of(trained, tmp_path))
    cfg = folder.config(["analyze.reference=test", "analyze.amp=false", "train.amp=true"])
    analyze_job(cfg, folder, progress=False)
    assert seen and set(seen) == {False}


def test_ncc_means_from_a_class_balanced_reference_subset(trained, tmp_path):
    """analyze.reference_subset: the NCC means (and the reference rows) come from a
    class-balanced subset of the reference split; the measured split stays whole; the
    setting is part of the stage's fingerprint; fewer samples than classes is refused."""
    import nclayers
    from nclayers.data import load_dataset, make_batches
    from nclayers.errors import NCLayersError
    from nclayers.jobs.analyze import reference_set

    folder = RunFolder(copy_of(trained, tmp_path))
    cfg = folder.config(["analyze.reference_subset=30"])
    table = analyze_job(cfg, folder, progress=False).table
    assert {r["n"] for r in table if r["split"] == "train"} == {30}
    assert {r["n"] for r in table if r["split"] == "test"} == {100}
    subset = reference_set(cfg, load_dataset(cfg.data, "train"))
    assert len(subset) == 30 and torch.bincount(subset.labels["clean"]).tolist() == [3] * 10
    model = load_model(cfg, folder, 10)
    ref = nclayers.analyze(model, make_batches(subset, 100), 10, progress=False)
    want = nclayers.analyze(model, make_batches(load_dataset(cfg.data, "test"), 100), 10,
                            reference=ref, progress=False)  # fmt: skip
    assert [r["ncc_acc"] for r in table if r["split"] == "test"] == [r["ncc_acc"] for r in want]
    assert folder.status("analyze", cfg) == "done"
    whole = cfg.updated({"analyze.reference_subset": None})
    assert "analyze.reference_subset" in folder.status("analyze", whole)
    with pytest.raises(NCLayersError, match=r"analyze.reference_subset=5: fewer samples than"):
        analyze_job(folder.config(["analyze.reference_subset=5"]), folder, progress=False)


# ----------------------------------------------------------------------------- files
def test_writes_are_atomic_and_checked(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_json("a.json", {"x": float("nan"), "y": [1.0, float("inf")]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": None, "y": [1.0, None]}
    folder.write_table("t.csv", Table([{"run": "", "block": "0", "memorizing": True}]))
    back = folder.read_table("t.csv")
    assert back[0] == {"run": "", "block": "0", "memorizing": True}
    # A file changed behind nclayers' back is refused, naming it and what to do.
    (tmp_path / "t.csv").write_text("run,block,memorizing\n,0,False\n")
    with pytest.raises(ValueError, match=r"t\.csv is damaged \(30 bytes, 29 were written"):
        folder.read_table("t.csv")
    assert not list(tmp_path.glob(".*.tmp"))


def test_table_csv_round_trip_keeps_types():
    """14.6's house: block names stay text, flags stay bools, an empty run stays ''."""
    t = Table([{"run": "", "block": "10", "layer": 1, "memorizing": False, "nc1": 0.1 + 0.2}])
    back = Table.from_csv_text(t.to_csv_text())
    assert back[0] == {"run": "", "block": "10", "layer": 1, "memorizing": False,
                       "nc1": 0.1 + 0.2}  # fmt: skip
    with pytest.raises(ValueError, match="line 2 has 2 fields"):
        Table.from_csv_text("run,layer,nc1\n,1\n")
    with pytest.raises(ValueError, match="last line is cut off"):
        Table.from_csv_text("run,layer,nc1\n,1,0.5")
    with pytest.raises(ValueError, match="column 'layer'"):
        Table.from_csv_text("run,layer\n,x\n")


def test_the_lock_keeps_a_second_process_out(tmp_path):
    import subprocess
    import sys
    import time

    folder = RunFolder(tmp_path)
    code = ("import sys, time; from nclayers.jobs import RunFolder\n"
            "f = RunFolder(sys.argv[1])\n"
            "with f.lock(wait_message=False):\n"
            "    print('got', time.time(), flush=True)\n")  # fmt: skip
    with folder.lock():
        child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                                 stdout=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(3.0)
        released = time.time()
    got = float(child.communicate(timeout=60)[0].split()[1])
    assert got >= released
