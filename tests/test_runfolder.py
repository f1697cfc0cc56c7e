"""Run folders: stages, layers.csv merging, and the jobs that sit on them."""

from __future__ import annotations

import pytest
import torch

from nclayers.cli import main
from nclayers.config import load_config
from nclayers.jobs import RunFolder, analyze_run, load_model, train_run
from nclayers.jobs.folder import CHECKPOINT, LAYERS, SUMMARY

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stages_are_recorded_and_forgotten(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert not folder.done("train")
    folder.mark_done("train", epochs=3)
    folder.mark_done("analyze")
    assert folder.done("train") and folder.done("analyze")
    assert folder.stages()["train"]["epochs"] == 3
    folder.forget("analyze")
    assert folder.done("train") and not folder.done("analyze")


def test_upsert_fills_columns_of_matching_rows_and_appends_others(tmp_path):
    folder = RunFolder(tmp_path)
    analysis = [
        {"run": "a", "split": "test", "view": "clean", "layer": i, "nc1": 10.0 / i} for i in (1, 2)
    ]
    folder.upsert_layers(analysis)
    probe = [{"run": "a", "split": "test", "view": "clean", "layer": 2, "probe_acc": 0.9}]
    probe.append({"run": "a", "split": "test", "view": "clean", "layer": 3, "probe_acc": 0.95})
    table = folder.upsert_layers(probe)
    assert len(table) == 3
    by_layer = {r["layer"]: r for r in folder.layers()}
    assert by_layer[2]["nc1"] == 5.0 and by_layer[2]["probe_acc"] == 0.9
    assert by_layer[1]["probe_acc"] is None and by_layer[3]["nc1"] is None
    # A re-analysis overwrites its own columns and keeps the probe's.
    folder.upsert_layers([{**analysis[1], "nc1": 4.0}])
    row = {r["layer"]: r for r in folder.layers()}[2]
    assert row["nc1"] == 4.0 and row["probe_acc"] == 0.9


def test_load_config_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="not a run folder"):
        RunFolder(tmp_path).load_config()


TINY = [
    "data.name=digits", "data.train_subset=100", "data.test_subset=100", "model.width=4",
    "train.epochs=1", "train.batch_size=50", "train.checkpoint_every=0", "device=cpu",
    "analyze.batch_size=100", "train.tensorboard=false",
]  # fmt: skip


def test_analyze_a_trained_run_folder_uses_its_checkpoint(tmp_path):
    cfg = load_config(None, [*TINY, f"out={tmp_path / 'run'}", "run=tiny"])
    trained = train_run(cfg, progress=False)["model"]
    folder = RunFolder(cfg.out)
    assert folder.done("train") and folder.exists(CHECKPOINT)
    # The folder's own config and checkpoint give back the trained weights.
    again = load_model(folder.load_config(), 10, folder)
    for key, value in trained.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    # `nclayers analyze RUN_FOLDER` measures that model into the same folder.
    assert main(["analyze", str(folder.path), "-q"]) == 0
    assert folder.done("analyze") and folder.exists(LAYERS) and folder.exists(SUMMARY)
    rows = folder.layers()
    assert {r["split"] for r in rows} == {"train", "test"}
    assert {r["run"] for r in rows} == {"tiny"}
    # The same numbers as analyzing the trained model directly.
    direct = analyze_run(load_config(None, [*TINY, f"out={tmp_path / 'direct'}"]), trained, False)
    ours = sorted((r["split"], r["layer"], r["nc1"]) for r in rows)
    theirs = sorted((r["split"], r["layer"], r["nc1"]) for r in direct)
    assert ours == theirs


def test_train_summary_reports_the_noise_rate_and_the_memorized_fraction(tmp_path):
    from nclayers.data import load_dataset
    from nclayers.memorization import memorized_fraction

    cfg = load_config(None, [*TINY, f"out={tmp_path}", "data.noise=0.5", "train.epochs=2"])
    result = train_run(cfg, progress=False)
    noise = RunFolder(tmp_path).read_json("train_summary.json")["label_noise"]
    ds = load_dataset(cfg.data, "train")
    changed = int((ds.labels["clean"] != ds.labels["noisy"]).sum())
    assert noise["changed"] == changed and noise["rate"] == changed / len(ds)
    assert noise["source"] == "shuffle:0.5"
    expected = memorized_fraction(result["model"], ds)
    assert noise["memorized"] == expected["memorized"]
    assert noise["changed_true_acc"] == expected["changed_true_acc"]
