"""Ordinary mistakes end in one line naming the path, key or value and the fix (exit
status 2; Ctrl-C 130), never in a traceback: paths that cannot be written, files that are
not what a verb reads, options that match nothing, edited and unfinished runs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nclayers.cli import main
from nclayers.config import load_config
from nclayers.jobs import RunFolder
from nclayers.jobs.train import train_job

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["data.name=digits", "data.train_subset=100", "data.test_subset=100", "model.width=4",
        "train.epochs=2", "train.batch_size=50", "train.tensorboard=false", "device=cpu",
        "analyze.batch_size=100"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("errors") / "run"
    assert main(["train", *TINY, "--out", str(out), "-q"]) == 0
    assert main(["analyze", str(out), "-q"]) == 0
    return out


def one_line(capsys, rc: int, expected: int = 2) -> str:
    out, err = capsys.readouterr()
    assert rc == expected, f"exit status {rc}\n{out}\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_out_through_a_file_names_the_path(run, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub"
    line = one_line(capsys, main(["analyze", str(run), "--out", str(out), "-q"]))
    assert str(tmp_path / "afile") in line and "not a folder" in line and "--out" in line


def test_report_out_an_existing_folder_writes_the_report_inside(run, tmp_path, capsys):
    (tmp_path / "reports").mkdir()
    assert main(["report", str(run), "--out", str(tmp_path / "reports")]) == 0
    assert (tmp_path / "reports" / "report.html").is_file()


def test_an_unwritable_run_folder_is_one_line(run, tmp_path, capsys):
    copy = tmp_path / "ro"
    shutil.copytree(run, copy)
    (copy / ".lock").unlink(missing_ok=True)
    # Root writes anywhere: an immutable folder refuses it too (ext4, xfs, btrfs).
    if subprocess.run(["chattr", "+i", str(copy)], capture_output=True).returncode:
        if os.geteuid() == 0:
            pytest.skip("no chattr here and root ignores permissions")
        copy.chmod(0o500)
    try:
        line = one_line(capsys, main(["analyze", str(copy), "analyze.split=train", "-q"]))
        assert f"{copy}/: permission denied" in line and "--out DIR" in line
        # Measured into another folder it works.
        assert main(["analyze", str(copy), "--out", str(tmp_path / "elsewhere"), "-q"]) == 0
    finally:
        subprocess.run(["chattr", "-i", str(copy)], capture_output=True)
        copy.chmod(0o700)


def test_a_text_file_as_checkpoint_is_one_line(run, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello, these are not weights\n")
    line = one_line(capsys, main(["analyze", str(run), f"model.checkpoint={text}",
                                  "--out", str(tmp_path / "x"), "-q"]))  # fmt: skip
    assert str(text) in line and "cannot be read" in line


def test_a_missing_run_folder_is_said_to_be_missing(tmp_path, capsys):
    line = one_line(capsys, main(["analyze", str(tmp_path / "missing"), "-q"]))
    assert f"run folder {str(tmp_path / 'missing')!r} does not exist" in line
    line = one_line(capsys, main(["analyze", str(tmp_path / "missing.yaml"), "-q"]))
    assert "config file" in line and "does not exist" in line


def test_plot_options_that_match_nothing_are_refused(run, tmp_path, capsys):
    csv = str(run / "layers.csv")
    line = one_line(capsys, main(["plot", csv, "--split", "val", "--out", str(tmp_path)]))
    assert "--split val" in line and "its splits: test, train" in line
    line = one_line(capsys, main(["plot", csv, "--metric", "bogus", "--out", str(tmp_path)]))
    assert "no 'bogus' column" in line and "nc1" in line
    assert not list(tmp_path.iterdir())
    assert main(["plot", csv, "--split", "test", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "nc1.png").is_file()


def test_memorization_and_plot_check_the_columns_they_read(run, tmp_path, capsys):
    csv = str(run / "layers.csv")
    line = one_line(capsys, main(["memorization", csv, "--key", "input"]))
    assert "no 'input' column" in line and "--key" in line
    header, *rows = (run / "layers.csv").read_text().splitlines()
    keep = [i for i, c in enumerate(header.split(",")) if c in ("run", "split", "view", "layer",
                                                                 "block")]  # fmt: skip
    cut = tmp_path / "layers.csv"
    cut.write_text("\n".join(",".join(r.split(",")[i] for i in keep) for r in [header, *rows]))
    cut.write_text(cut.read_text() + "\n")
    for verb in (["memorization", str(cut)], ["plot", str(cut)]):
        line = one_line(capsys, main(verb))
        assert "no 'nc1' column" in line and "nclayers analyze" in line


def test_make_folder_refuses_counts_below_one(tmp_path, capsys):
    for count in ("0", "-3"):
        line = one_line(capsys, main(["make-folder", str(tmp_path / count), "--per-class", count]))
        assert f"per_class={count} (--per-class): expected at least 1" in line
        assert "quality" not in line and not (tmp_path / count).exists()


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "nclayers.cli", "train", *TINY, "train.epochs=500",
           "--out", str(out), "-q"]  # fmt: skip
    # As typed in a terminal: SIGINT acts (a shell ignores it in its background jobs).
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not (out / "config.yaml").is_file() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err.decode()
    assert err.decode().strip().splitlines() == ["nclayers train: interrupted"]


def test_a_run_measured_elsewhere_stores_absolute_paths(run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(run.parent)
    assert main(["analyze", run.name, "--out", "measured", "-q"]) == 0
    saved = yaml.safe_load((run.parent / "measured" / "config.yaml").read_text())
    assert saved["model"]["checkpoint"] == str(run / "checkpoint.pt")
    monkeypatch.chdir(tmp_path)  # the measured folder works from anywhere
    assert main(["analyze", str(run.parent / "measured"), "-q"]) == 0


def test_an_unfinished_training_is_measured_with_a_warning_naming_the_epoch(tmp_path, capsys):
    cfg = load_config(None, [*TINY, "train.epochs=4"])
    folder = RunFolder(tmp_path / "run")
    train_job(cfg, folder, progress=False, stop_after=2)
    capsys.readouterr()
    assert main(["analyze", str(folder.path), "-q"]) == 0
    err = capsys.readouterr().err
    assert "training is unfinished (checkpoint at epoch 2 of train.epochs=4)" in err
    assert "--resume" in err


def test_an_edited_config_is_told_apart_from_a_damaged_one(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    text = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(text.replace("dir: null", f"dir: {tmp_path}"))
    capsys.readouterr()
    assert main(["analyze", str(copy), "-q"]) == 0  # a measurement key: accepted, said once
    assert "was edited; the keys that define the weights are unchanged" in capsys.readouterr().err
    assert main(["analyze", str(copy), "-q"]) == 0
    assert "edited" not in capsys.readouterr().err
    edited = text.replace("lr: 0.1\n", "lr: 0.2\n")
    assert edited != text
    (copy / "config.yaml").write_text(edited)
    line = one_line(capsys, main(["analyze", str(copy), "-q"]))
    assert "train.lr: 0.1 -> 0.2" in line and "nclayers train" in line
    (copy / "config.yaml").write_text(text[: len(text) // 2])  # cut: damaged, not edited
    line = one_line(capsys, main(["analyze", str(copy), "-q"]))
    assert str(copy / "config.yaml") in line and "damaged" in line


def test_an_unknown_slurm_key_lists_slurm_keys(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "root": str(tmp_path), "config": {}}))
    line = one_line(capsys, main(["sweep", str(sweep), "slurm.partitio=x", "--print"]))
    assert "unknown key 'slurm.partitio'" in line and "slurm.partition," in line
    assert "mathtext" not in line


def test_quiet_silences_submitit_warnings(tmp_path):
    """-q: submitit's warnings (e.g. "Bypassing sacct error", at every poll of a cluster
    without accounting) are not printed while the command runs; without -q they are.
    Once it returns, submitit warns again. Each in its own process, as the command line
    runs; the command (analyze) imports submitit and warns as a sweep's poll would."""
    code = ("import sys; from nclayers import cli; real = cli.cmd_analyze\n"
            "def poll(args):\n"
            "    from submitit.core import logger\n"
            "    logger.warning('Call #1 - Bypassing sacct error')\n"
            "    return real(args)\n"
            "cli.cmd_analyze = poll; cli.main(sys.argv[1:])\n"
            "from submitit.core import logger; logger.warning('after the command')")  # fmt: skip
    # A fresh command line: not the settings an earlier in-process `main(-q)` left.
    env = {k: v for k, v in os.environ.items() if k != "SUBMITIT_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    said = {}
    for quiet in ([], ["-q"]):
        args = [sys.executable, "-c", code, "analyze", str(tmp_path / "missing"), *quiet]
        said[bool(quiet)] = subprocess.run(args, env=env, capture_output=True, text=True).stderr
    assert "Bypassing sacct error" in said[False]
    assert "Bypassing sacct error" not in said[True]
    assert "after the command" in said[True] and "after the command" in said[False]
    assert "run folder" in said[True]  # the error itself is still said
