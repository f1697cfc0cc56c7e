"""Operation counts of the per-batch paths, under TorchDispatchMode: every aten call
(views included) between two batches is counted. The analysis adds few operations per
block and batch for all labels views together, and neither it nor training reads a value
back from the device (`aten._local_scalar_dense`) while batches run."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nclayers
from nclayers.models import build_model, find_blocks
from nclayers.train import evaluate, train_epoch

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_OPS_PER_BLOCK = 16
SYNC = "aten._local_scalar_dense"


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class Marked:
    """Iterates `data`, recording the operation counts each time a batch is asked for:
    the difference between two marks is what one batch cost."""

    def __init__(self, data, counter: CountOps) -> None:
        self.data, self.counter, self.marks = data, counter, []

    def __len__(self) -> int:
        return len(self.data)

    def __getattr__(self, name: str):  # e.g. DeviceBatches' device and views
        return getattr(self.data, name)

    def __iter__(self):
        for batch in self.data:
            self.marks.append(self.counter.ops.copy())
            yield batch
        self.marks.append(self.counter.ops.copy())

    def during_batches(self) -> collections.Counter:
        return self.marks[-1] - self.marks[0]


def count(fn, data) -> collections.Counter:
    with CountOps() as counter:
        marked = Marked(data, counter)
        fn(marked)
    assert len(marked.marks) == len(data) + 1
    return marked.during_batches()


def tiny_setup():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=8).eval()
    gen = torch.Generator().manual_seed(0)
    n, bs = 96, 16
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.arange(n) % 10
    noisy = y[torch.randperm(n, generator=gen)]
    data = [(x[i : i + bs], {"clean": y[i : i + bs], "noisy": noisy[i : i + bs]})
            for i in range(0, n, bs)]  # fmt: skip
    return model, data


def analyze_cost(model, data, with_reference: bool) -> tuple[float, int, collections.Counter]:
    """(operations per block and batch beyond plain inference, device reads during the
    batches, the extra operations) of `analyze` with two labels views."""
    blocks = len(find_blocks(model))
    reference = nclayers.analyze(model, data, 10, progress=False) if with_reference else None

    @torch.no_grad()
    def inference(batches):
        for x, _ in batches:
            model(x)

    plain = count(inference, data)
    ops = count(lambda b: nclayers.analyze(model, b, 10, reference=reference, progress=False), data)
    per_block = (sum(ops.values()) - sum(plain.values())) / (blocks * len(data))
    return per_block, ops[SYNC], ops - plain


@pytest.fixture(scope="module")
def setup():
    return tiny_setup()


@pytest.mark.parametrize("with_reference", [False, True])
def test_analyze_adds_few_operations_and_no_sync(setup, with_reference):
    per_block, syncs, extra = analyze_cost(*setup, with_reference)
    assert syncs == 0, "analyze read the device during the batches"
    assert 0 < per_block <= MAX_OPS_PER_BLOCK, (per_block, extra.most_common(12))


def test_training_epoch_and_evaluation_do_not_sync(setup):
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    _, data = setup
    train = [(x, y["clean"]) for x, y in data[:4]]
    steps = count(lambda b: train_epoch(model, optimizer, b), train)
    assert steps[SYNC] == 0 and steps["aten.convolution_backward"] > 0

    class Batches(list):  # what evaluate reads of DeviceBatches
        def __init__(self, items) -> None:
            super().__init__(items)
            self.device, self.views = torch.device("cpu"), ["clean"]

    ops = count(lambda b: evaluate(model, b, amp=False), Batches(data))
    assert ops[SYNC] == 0 and ops["aten.convolution"] > 0


def test_compiled_training_compiles_once_per_epoch_shape():
    """The epoch's last, smaller batch runs the original module: no recompilation for it
    (nor a switch to dynamic shapes), and the same steps as an eager model otherwise."""
    compiled_shapes = []

    def backend(graph, inputs):  # records every compilation, then runs the graph as is
        compiled_shapes.append([tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)])
        return graph.forward

    def small():  # a small convnet: tracing a ResNet would cost seconds and show nothing more
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10),
        )  # fmt: skip

    eager, twin = small(), small()
    compiled = torch.compile(twin, backend=backend, dynamic=False)
    gen = torch.Generator().manual_seed(1)
    sizes = [8, 8, 5]
    data = [(torch.randn(n, 3, 32, 32, generator=gen), torch.arange(n) % 10) for n in sizes]
    results = []
    for net, params in ((eager, eager.parameters()), (compiled, twin.parameters())):
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        results.append([train_epoch(net, optimizer, data) for _ in range(2)])
    assert len(compiled_shapes) == 1
    assert (8, 3, 32, 32) in compiled_shapes[0] and (5, 3, 32, 32) not in compiled_shapes[0]
    for (loss_a, hits_a, n_a), (loss_b, hits_b, n_b) in zip(*results, strict=True):
        assert n_a == n_b == 21 and int(hits_a) == int(hits_b)
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    # The figures behind the limits above, for any version of the package on the path:
    #   python tests/test_opcount.py            (PYTHONPATH=OTHER/src for another version)
    model, data = tiny_setup()
    for with_reference in (False, True):
        per_block, syncs, _ = analyze_cost(model, data, with_reference)
        print(f"analyze, 2 views, NCC {'on ' if with_reference else 'off'}: "
              f"{per_block:.2f} ops per block and batch beyond inference, "
              f"{syncs} device reads during the batches")  # fmt: skip
