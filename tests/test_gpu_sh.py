"""benchmarks/gpu.sh, the one script a lent GPU runs, kept from rotting: its smoke mode
runs every step on the CPU with tiny sizes and writes the figures' JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["env_check", "analyze_resnet18", "imagenet", "hf", "train_compile",
         "analyze_resnet152", "probe", "train_overhead", "analyze_run"]  # fmt: skip


@pytest.mark.slow
def test_gpu_sh_smoke_runs_every_step_and_writes_figures_with_targets(shared_data, tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "GPU_SH_SMOKE": "1", "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(shared_data),
                          str(out)], env=env, capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result["steps"]) == STEPS
    failed = {k: v for k, v in result["steps"].items() if v["rc"] != "0"}
    assert not failed, (failed, run.stdout[-3000:])
    figures = result["figures"]
    assert figures["env_check_all_ok"]["pass"] is True
    for name, figure in figures.items():
        assert set(figure) >= {"value", "target", "pass"}, name
        assert figure["value"] is not None, name  # every step left its figure
        if figure["target"] is not None:
            assert isinstance(figure["pass"], bool), name
