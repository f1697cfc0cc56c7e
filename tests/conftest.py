from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests are small: two threads match CI's two cores and keep timings stable.
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.skip(f"real CIFAR-10 not found at {SHARED_DATA}")
    return SHARED_DATA
