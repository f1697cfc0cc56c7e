"""The command line end to end, on the embedded digits and tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from nclayers.cli import main
from nclayers.models import build_model
from nclayers.table import Table

FAST = ["data.name=digits", "data.test_subset=200", "data.train_subset=300", "model.width=4",
        "device=cpu"]  # fmt: skip


def test_analyze_with_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=4)
    ckpt = tmp_path / "w.pt"
    torch.save({"model": model.state_dict()}, ckpt)
    out = tmp_path / "run"
    rc = main(["analyze", *FAST, f"model.checkpoint={ckpt}", "--out", str(out), "-q"])
    assert rc == 0
    table = Table.from_csv(out / "layers.csv")
    for col in ("layer", "block", "dim", "split", "view", "nc1", "cdnv_mean", "nc2", "ncc_acc"):
        assert col in table.columns
    test = table.where(split="test")
    assert [r["layer"] for r in test] == list(range(1, 9))
    assert all(0.0 <= r["ncc_acc"] <= 1.0 for r in test)
    assert {r["split"] for r in table} == {"train", "test"}
    summary = json.loads((out / "summary.json").read_text())["analyze"]
    assert summary["samples"] == {"train": 300, "test": 200}
    assert summary["weights"]["file"] == str(ckpt.resolve())
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["checkpoint"] == str(ckpt)
    assert "layer4.1" in capsys.readouterr().out


def test_wrong_checkpoint_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "w.pt"
    torch.save(build_model("resnet18", 10, width=8).state_dict(), ckpt)
    rc = main(["analyze", *FAST, f"model.checkpoint={ckpt}", "--out", str(tmp_path), "-q"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "shape mismatches" in err


def test_entry_point_model(tmp_path):
    out = tmp_path / "ep"
    rc = main(["analyze", *FAST, "model.name=torchvision.models:resnet18", "model.width=null",
               "analyze.reference=null", "model.untrained=true", "--out", str(out),
               "-q"])  # fmt: skip
    assert rc == 0
    rows = Table.from_csv(out / "layers.csv")
    assert len(rows) == 8 and rows[0]["block"] == "layer1.0" and rows[0]["ncc_acc"] is None


def test_blocks_verb(capsys):
    assert main(["blocks", "resnet18", "model.width=16"]) == 0
    out = capsys.readouterr().out
    assert "8 blocks" in out and "layer4.1" in out and "[1, 128, 4, 4]" in out


def test_errors_exit_2_with_a_message(capsys):
    assert main(["analyze", "train.epoch=3"]) == 2
    assert "unknown config key 'train.epoch'" in capsys.readouterr().err
    assert main(["blocks", "resnet19"]) == 2
    assert "Did you mean" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "nclayers.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    for verb in ("demo", "train", "analyze", "blocks", "plot", "memorization"):
        assert verb in out


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """A shortened demo: every file written, and NC1 falls from the first to the last block."""
    out = tmp_path / "demo"
    assert main(["demo", "train.epochs=4", "--out", str(out), "-q"]) == 0
    for name in ("layers.csv", "memorization.csv", "summary.json", "nc1.png", "nc2.png",
                 "ncc_acc.png", "memorization.png"):  # fmt: skip
        assert (out / name).is_file(), name
    table = Table.from_csv(out / "layers.csv")
    test = table.where(run="clean", split="test", view="clean")
    nc1 = test.column("nc1")
    assert len(nc1) == 8 and nc1[-1] < nc1[0]
    assert set(table.where(run="noise40", split="train").column("view")) == {"clean", "noisy"}
    assert main(["memorization", str(out / "layers.csv"), "--out", str(tmp_path)]) == 0
    assert main(["plot", str(out / "layers.csv"), "--metric", "nc1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "nc1.png").is_file()


def test_overrides_after_options(tmp_path):
    out = tmp_path / "o"
    rc = main(["analyze", "--out", str(out), *FAST, "analyze.reference=null",
               "model.untrained=true", "-q"])  # fmt: skip
    assert rc == 0 and len(Table.from_csv(out / "layers.csv")) == 8
    assert main(["analyze", "--out", str(out), "missing.yaml"]) == 2  # no such config file
    with pytest.raises(SystemExit):
        main(["analyze", "--out", str(out), "--bogus"])


def _huge_pages_mode() -> str:
    """The kernel's transparent huge pages mode: "always", "madvise", "never" (or "")."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return ""
    return text[text.find("[") + 1 : text.find("]")]


def test_import_changes_no_environment_and_huge_pages_are_the_users_opt_in():
    """`import nclayers` leaves the environment as it was (THP_MEM_ALLOC_ENABLE unset stays
    unset); a user who sets THP_MEM_ALLOC_ENABLE=1 gets huge pages from PyTorch's CPU
    allocator: a fresh 64 MB tensor then takes a few hundred page faults (583 here)
    instead of 16,384, one per 4 KB page."""
    code = (
        "import os, resource\n"
        "before_env = dict(os.environ)\n"
        "import nclayers, nclayers.analysis, nclayers.cli, torch\n"
        "assert dict(os.environ) == before_env, set(os.environ.items()) ^ set(before_env.items())\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "torch.ones(2**24)\n"
        "faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "print(os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset'), faults)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}

    def run(extra: dict) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra},
                             capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
        return out[-2], int(out[-1])

    (default, faults_default), (on, faults_on) = run({}), run({"THP_MEM_ALLOC_ENABLE": "1"})
    assert (default, on) == ("unset", "1")
    # Only where the kernel gives huge pages to the regions that ask for them, and only
    # to those, does the switch decide ("always" gives them to all, "never" to none).
    if _huge_pages_mode() == "madvise":
        assert faults_default >= 2**26 // 4096
        assert faults_on < faults_default // 4


def _logging_state() -> tuple:
    """What the command line may change in the process: the environment, the "nclayers"
    and "submitit" loggers, transformers' verbosity and progress bars."""
    import logging

    hf = sys.modules.get("transformers.utils.logging")
    ours = logging.getLogger("nclayers")
    return (
        dict(os.environ), ours.handlers[:], ours.level, ours.propagate,
        logging.getLogger("submitit").level,
        (hf.get_verbosity(), hf.is_progress_bar_enabled()) if hf else None,
    )  # fmt: skip


def test_quiet_lasts_only_as_long_as_its_command(tmp_path, caplog):
    """-q silences the libraries while its command runs; once `main` returns, the process
    is as before: the same settings, and a library call after it is heard (label noise,
    logged at INFO)."""
    import logging

    from nclayers.config import DataConfig
    from nclayers.data import load_dataset

    pytest.importorskip("transformers")
    import transformers.utils.logging  # noqa: F401  (imported before: told directly)

    env, *before = _logging_state()
    for quiet in (["-q"], []):
        assert main(["analyze", str(tmp_path / "missing"), *quiet]) == 2
        env_after, *after = _logging_state()
        assert {k for k in {*env, *env_after} if env.get(k) != env_after.get(k)} == set()
        assert after == before
    with caplog.at_level(logging.INFO):
        load_dataset(DataConfig(name="digits", noise=0.4, train_subset=100), "train")
    assert "training labels differ from the true ones" in caplog.text
