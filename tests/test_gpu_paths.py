"""The code written for GPUs, run on the CPU where PyTorch can: bf16 autocast in the
analysis, channels_last, torch.compile (inductor) of the training step and of the
analysed model. `speed_switches_on("cpu")` lets the switches act on the CPU, through the
same code a GPU run takes. (The folder pipeline's device decoder on the CPU:
tests/test_imagefolder.py, test_device_decoder_on_the_cpu_equals_the_worker_decoder.)"""

from __future__ import annotations

import pytest
import torch

from nclayers.analysis import analyze
from nclayers.cli import main
from nclayers.config import DataConfig
from nclayers.data import DeviceBatches, load_dataset
from nclayers.metrics import BlockStats, LabelViews
from nclayers.models import build_model
from nclayers.runtime import autocast, speed_switches, speed_switches_on
from nclayers.table import Table

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["data.name=digits", "data.test_subset=200", "data.train_subset=300", "model.width=4",
        "device=cpu", "model.untrained=true"]  # fmt: skip


@pytest.fixture(scope="module")
def digits():
    cfg = DataConfig(name="digits", train_subset=300, test_subset=400)
    return load_dataset(cfg, "train"), load_dataset(cfg, "test")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("resnet18", 10, width=8).eval()


def test_speed_switches_act_on_cuda_by_default_and_on_the_cpu_when_asked():
    assert speed_switches("cuda") and not speed_switches("cpu")
    assert isinstance(
        autocast(torch.device("cpu"), True), type(autocast(torch.device("cpu"), False))
    )
    with speed_switches_on("cpu"):
        assert speed_switches("cpu")
        with autocast(torch.device("cpu"), True):
            assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16
    assert not speed_switches("cpu")


def test_bf16_analysis_on_the_cpu_keeps_float64_statistics_near_float32(digits, model):
    """bf16 autocast of the model (the GPU path) with float64 statistics: per block NC1
    within 5 % of float32's, NC2 within 0.02, NCC accuracy within 1 point."""
    train, test = digits
    ref = analyze(model, DeviceBatches(train, 100), 10, amp=False, progress=False)
    f32 = analyze(model, DeviceBatches(test, 100), 10, reference=ref, amp=False, progress=False)
    with speed_switches_on("cpu"):
        bf16 = analyze(model, DeviceBatches(test, 100), 10, reference=ref, amp=True,
                       progress=False)  # fmt: skip
    assert all(s["clean"].means.dtype == torch.float64 for s in bf16.stats)
    assert all(s["clean"].m2.dtype == torch.float64 for s in bf16.stats)
    assert len(f32) == len(bf16) == 8
    for a, b in zip(f32, bf16, strict=True):
        assert abs(b["nc1"] / a["nc1"] - 1) <= 0.05, (a["block"], a["nc1"], b["nc1"])
        assert abs(b["nc2"] - a["nc2"]) <= 0.02, (a["block"], a["nc2"], b["nc2"])
        assert abs(b["ncc_acc"] - a["ncc_acc"]) <= 0.01 + 1e-9, (
            a["block"],
            a["ncc_acc"],
            b["ncc_acc"],
        )
    # The autocast acted: bf16 features are not float32's.
    assert any(a["nc1"] != b["nc1"] for a, b in zip(f32, bf16, strict=True))


class Formats:
    """A global forward pre-hook: per convolution called, whether its input is
    channels_last (a real hook on the real modules; removed on exit)."""

    def __enter__(self) -> list[bool]:
        self.seen: list[bool] = []

        def hook(module, args):
            x = args[0] if args else None
            if isinstance(module, torch.nn.Conv2d) and isinstance(x, torch.Tensor):
                self.seen.append(x.is_contiguous(memory_format=torch.channels_last)
                                 and not x.is_contiguous())  # fmt: skip

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self.seen

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_channels_last_analysis_job_equals_contiguous(tmp_path):
    """`nclayers analyze` with analyze.channels_last where the switches act: the model and
    batches in channels_last (checked on the model's inputs), results within 1e-5."""
    tables = {}
    with speed_switches_on("cpu"):
        for fmt in (True, False):
            out = tmp_path / str(fmt)
            with Formats() as seen:
                assert main(["analyze", *FAST, "analyze.amp=false",
                             f"analyze.channels_last={str(fmt).lower()}", "--out", str(out),
                             "-q"]) == 0  # fmt: skip
            assert seen and all(s == fmt for s in seen)
            tables[fmt] = Table.from_csv(out / "layers.csv")
    a, b = tables[True], tables[False]
    assert len(a) == len(b) == 16
    for ra, rb in zip(a, b, strict=True):
        for col in ("nc1", "nc2"):
            assert ra[col] == pytest.approx(rb[col], rel=1e-5), (ra["block"], col)
        assert ra["ncc_acc"] == pytest.approx(rb["ncc_acc"], abs=1e-5)


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["stats"].values()) and counters["stats"]["unique_graphs"]


def tiny_convnet(num_classes: int = 10, width: int = 4, **_) -> torch.nn.Module:
    """A two-convolution net (`model.name=test_gpu_paths:tiny_convnet`): inductor compiles
    its training step in seconds, where a ResNet takes minutes on two cores."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
        torch.nn.Conv2d(width, 2 * width, 3, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2 * width, num_classes),
    )  # fmt: skip


@pytest.mark.slow
def test_compiled_training_job_on_the_cpu_equals_eager(tmp_path):
    """`nclayers train` with train.compile where the switches act: inductor compiles the
    training step (C++ on the CPU), and the epoch's steps give eager's weights within
    float32 tolerance."""
    import torch._dynamo

    torch._dynamo.reset()
    runs = {}
    with speed_switches_on("cpu"):
        for compiled in (True, False):
            before = compiled_graphs()
            out = tmp_path / str(compiled)
            assert main(["train", *FAST[:-1], "model.name=test_gpu_paths:tiny_convnet",
                         "train.epochs=1", "train.batch_size=100", "train.amp=false",
                         "train.channels_last=false", "train.augment=false",
                         f"train.compile={str(compiled).lower()}", "train.tensorboard=false",
                         "train.track_nc_every=0", "--out", str(out), "-q"]) == 0  # fmt: skip
            assert (compiled_graphs() > before) == compiled
            runs[compiled] = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    for name, eager in runs[False].items():
        torch.testing.assert_close(runs[True][name], eager, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_model_analysis_on_the_cpu_equals_eager(digits, model):
    """analyze of a torch.compile'd model (inductor on the CPU): the taps still see every
    block, and the results are eager's within float32 tolerance."""
    import torch._dynamo

    torch._dynamo.reset()
    _, test = digits
    eager = analyze(model, DeviceBatches(test, 100), 10, amp=False, progress=False)
    before = compiled_graphs()
    compiled = analyze(torch.compile(model), DeviceBatches(test, 100), 10, amp=False,
                       progress=False)  # fmt: skip
    assert compiled_graphs() > before
    assert len(eager) == len(compiled) == 8
    for a, b in zip(eager, compiled, strict=True):
        assert b["nc1"] == pytest.approx(a["nc1"], rel=1e-4), a["block"]
        assert b["nc2"] == pytest.approx(a["nc2"], rel=1e-4, abs=1e-6), a["block"]
    assert compiled.accuracy["clean"] == pytest.approx(eager.accuracy["clean"], abs=0.01)


def test_next_token_statistics_skip_positions_of_no_class_bit_for_bit():
    """Token labels are mostly -1 (padding, the last token, tokens outside the top K): on
    the CPU their plans leave those positions out (`LabelPlan.compact`), and every
    statistic is bit for bit what the whole batch gives, invalid-label counts included."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for sparse in (True, False):
        views = LabelViews(["clean", "other"], 5)
        stats = BlockStats(views, 7)
        gen.manual_seed(0)
        for batch in (40, 40, 23):
            x = torch.randn(batch, 7, generator=gen) * 3 + 100
            y = torch.randint(-1, 5, (batch,), generator=gen)
            y[torch.rand(batch, generator=gen) < 0.5] = -1
            y[0] = -3  # an invalid label: counted, never in a class
            other = torch.where(torch.rand(batch, generator=gen) < 0.3, -1, y.clamp_min(0))
            plan = views.plan([y, other], sparse=sparse)
            assert (plan.compact is not None) == sparse
            stats.update(x, plan)
        out[sparse] = stats.class_stats()
    for view in ("clean", "other"):
        a, b = out[True][view], out[False][view]
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), (view, key)
