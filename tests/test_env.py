"""`nclayers env`: what a bug report needs, and the self-check of each device."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nclayers.cli import main
from nclayers.env import describe, self_check


def test_env_names_versions_devices_threads_and_huge_pages(capsys, monkeypatch):
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    lines = dict(describe())
    for key in ("nclayers", "python", "torch", "cuda", "cudnn", "torchvision", "timm",
                "transformers", "cpu threads", "huge pages"):  # fmt: skip
        assert key in lines and key in out
    assert lines["torch"] == torch.__version__ and torch.__version__ in out
    assert "THP_MEM_ALLOC_ENABLE=1" in lines["huge pages"]
    assert lines["cpu threads"].startswith(str(torch.get_num_threads()))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert sum(k.startswith("cuda:") for k in lines) == gpus


@pytest.mark.slow
def test_self_check_on_the_cpu_passes_every_line():
    checks = self_check(["cpu"])
    assert [(c.device, c.name) for c in checks] == [
        ("cpu", "decode"), ("cpu", "bf16"), ("cpu", "compile"), ("cpu", "gloo")]  # fmt: skip
    assert all(c.ok for c in checks), [c.line() for c in checks]


def test_a_failing_check_says_what_failed():
    from nclayers.env import _timed

    def broken() -> str:
        raise AssertionError("device decoding differs: mean 9.00, max 80 levels")

    check = _timed("cpu", "decode", broken)
    assert not check.ok and "FAILED" in check.line() and "mean 9.00" in check.line()


def test_env_verb_runs_without_a_model_or_config():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "nclayers.cli", "env"], env=env,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert out.splitlines()[0].startswith("nclayers")
