"""Layer pruning: replace shape-preserving blocks by the identity and measure the cost.

The paper reads the NC1 plateau of deep models as the reason their middle blocks can be
removed; this module checks that claim rather than repeating it. A residual block
computes x + f(x) (then, in a ResNet, a ReLU of a non-negative input), a transformer block
x + attn(x) + mlp(x): replacing either by `nn.Identity` keeps x, which is only possible
where the block's output has the shape of its input (not a stage's first, downsampling
block). Library functions take models and tensors and know no folders:

- `io_shapes`, `prunable_layers`, `check_prunable`: which blocks keep their shape;
- `resolve_blocks("3,layer3.1", blocks)`: 1-based block indices from indices or names;
- `prune_model(model, names)`: a deep copy with those blocks replaced by a `PassThrough`
  (the identity, returning the hidden state in the structure the removed layer returned:
  a tensor, or a tuple for transformers layers that return one);
- `baseline_sets`: the same number of blocks chosen last, and at random (several seeds);
- `finetune`: a short fine-tune with nclayers.train's epoch loop;
- `prune_experiment`: accuracy (and a causal LM's perplexity) and per-block NC of every
  variant, before and after the fine-tune; `prune_summary` says it in a few lines,
  `nclayers.report.prune_figures.plot_prune` draws it.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import statistics
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from nclayers.analysis import analyze
from nclayers.errors import NCLayersError
from nclayers.runtime import seeded
from nclayers.table import Table
from nclayers.taps import Block, forward_order, head, trace_blocks

NONE = "none"  # the unpruned model, the reference of every comparison


# ----------------------------------------------------------------------------- shapes
@torch.no_grad()
def io_shapes(
    model: nn.Module, blocks: Sequence[Block], sample: torch.Tensor
) -> list[tuple[tuple | None, tuple | None]]:
    """Run `sample` once; per block the shape of its (first) input and of its output,
    None where either is not a tensor."""

    def shape(t) -> tuple | None:
        return tuple(t.shape) if isinstance(t, torch.Tensor) else None

    return trace_blocks(
        model,
        blocks,
        sample,
        lambda _b, inputs, out: (shape(inputs[0] if inputs else None), shape(out)),
    )


def prunable_layers(model: nn.Module, blocks: Sequence[Block], sample: torch.Tensor) -> list[int]:
    """1-based indices of the blocks whose output has the shape of their input and whose
    module runs once per forward (not one call of a shared block)."""
    return [
        i + 1
        for i, (x, y) in enumerate(io_shapes(model, blocks, sample))
        if x is not None and x == y and not blocks[i].call
    ]


def check_prunable(
    model: nn.Module, blocks: Sequence[Block], layers: Sequence[int], sample: torch.Tensor
) -> None:
    """Refuse, naming them, the chosen blocks that are one call of a shared module and
    those whose output shape differs from the input."""
    shared = [blocks[l - 1].name for l in layers if blocks[l - 1].call]
    if shared:
        name = shared[0]
        path = name.rpartition("#")[0]
        calls = [b.name for b in blocks if b.call and b.path == path]
        raise NCLayersError(
            f"blocks: {name} is one call of {path}, which runs more than once per forward "
            f"({', '.join(calls)}): the identity would replace every call, not one; choose "
            "blocks that run once"
        )
    shapes = io_shapes(model, blocks, sample)
    bad = [l for l in layers if shapes[l - 1][0] is None or shapes[l - 1][0] != shapes[l - 1][1]]
    if bad:
        detail = ", ".join(
            f"{l} {blocks[l - 1].name} ({_shape(shapes[l - 1][0])} -> {_shape(shapes[l - 1][1])})"
            for l in bad
        )
        ok = [i + 1 for i, (x, y) in enumerate(shapes) if x is not None and x == y]
        raise NCLayersError(
            f"blocks: {detail} change the shape of their input, so the identity cannot "
            f"replace them; shape-preserving blocks: {_list(ok, blocks)}"
        )


def _shape(s) -> str:
    return "not a tensor" if s is None else "x".join(map(str, s))


def _list(layers: Sequence[int], blocks: Sequence[Block]) -> str:
    return ", ".join(f"{l} ({blocks[l - 1].name})" for l in layers) or "none"


# ----------------------------------------------------------------------------- choice
def resolve_blocks(spec: str | int | Sequence[str | int], blocks: Sequence[Block]) -> list[int]:
    """Sorted 1-based indices of the blocks named by `spec`: 1-based indices (as in
    layers.csv) and/or module names, as a list or a comma-separated string."""
    if isinstance(spec, int):
        spec = [spec]
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = {b.name: i + 1 for i, b in enumerate(blocks)}
    out: set[int] = set()
    for item in items:
        if item == "":
            continue
        text = str(item)
        if text.lstrip("-").isdigit():
            layer = int(text)
            if not 1 <= layer <= len(blocks):
                raise NCLayersError(
                    f"blocks: {layer} is not a block index; this model has blocks "
                    f"1..{len(blocks)} (see `nclayers blocks`)"
                )
            out.add(layer)
        elif text in names:
            out.add(names[text])
        else:
            sample = ", ".join(list(names)[:6])
            raise NCLayersError(
                f"blocks: {text!r} is not one of the model's blocks; give indices "
                f"1..{len(blocks)} or names such as {sample}, ..."
            )
    return sorted(out)


def baseline_sets(candidates: Sequence[int], k: int, seeds: Sequence[int]) -> dict[str, list[int]]:
    """The baselines removing `k` blocks: the last k candidates, and k drawn at random
    from the candidates for every seed (`random0`, `random1`, ...)."""
    candidates = sorted(candidates)
    if not 0 <= k <= len(candidates):
        raise NCLayersError(
            f"k={k}: only {len(candidates)} shape-preserving blocks can be removed; choose "
            "fewer blocks"
        )
    sets = {"last": candidates[len(candidates) - k :]}
    for seed in seeds:
        sets[f"random{seed}"] = sorted(random.Random(seed).sample(candidates, k))
    return sets


# ----------------------------------------------------------------------------- pruning
class PassThrough(nn.Identity):
    """A removed layer: returns its input hidden state in the structure the original layer
    returned, so the parent's loop goes on unchanged: the tensor itself (`extras=None`, as
    `nn.Identity` does), or a tuple (hidden, None, ...) of the original's length (e.g.
    DeBERTa-v2's (hidden, attention) and older transformers layers). The input is the
    first positional argument, else the `hidden_states` keyword. Plain attributes of the
    original (e.g. `attention_type`, `layer_idx`, which some models read off their
    layers) are kept."""

    def __init__(self, extras: int | None = None, **attributes) -> None:
        super().__init__()
        self.extras = extras
        for key, value in attributes.items():
            setattr(self, key, value)

    @classmethod
    def like(cls, module: nn.Module, extras: int | None = None) -> PassThrough:
        plain = (str, int, float, bool, type(None))
        attributes = {
            k: v for k, v in vars(module).items()
            if not k.startswith("_") and k not in ("training", "extras") and isinstance(v, plain)
        }  # fmt: skip
        return cls(extras, **attributes)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None:
            raise NCLayersError("PassThrough: called without an input hidden state")
        if self.extras is None:
            return hidden
        return (hidden, *([None] * self.extras))

    def extra_repr(self) -> str:
        return "tensor" if self.extras is None else f"tuple of {1 + self.extras}"


def output_structures(model: nn.Module, names: Sequence[str], sample=None) -> dict[str, int | None]:
    """Per module name: None where its output is a tensor, k where it is a tuple of k+1
    entries, from one traced forward of `sample` (for a transformers model without a
    sample: `models.hf.example_inputs`); without any sample every output counts as a
    tensor (the identity of an image model's block)."""
    from nclayers.models.hf import example_inputs, is_hf_model

    if sample is None and is_hf_model(model):
        sample = example_inputs(model, batch=1, length=4)
    if sample is None or not names:
        return dict.fromkeys(names)
    modules = dict(model.named_modules())
    blocks = [Block(n, modules[n]) for n in names]

    def record(_block, _inputs, out):
        if isinstance(out, torch.Tensor):
            return None
        if isinstance(out, tuple):
            return len(out) - 1
        raise NCLayersError(
            f"blocks: {_block.name} returns a {type(out).__name__}; a removed layer can stand "
            "in for layers that return a tensor or a tuple"
        )

    return dict(zip(names, trace_blocks(model, blocks, sample, record), strict=True))


def prune_model(model: nn.Module, names: Sequence[str], sample=None) -> nn.Module:
    """A deep copy of `model` with the named modules replaced by a `PassThrough` (an
    `nn.Identity` that returns what the removed module's caller expects, see
    `output_structures`); every other module, parameter and buffer is kept as it is."""
    modules = dict(model.named_modules())
    for name in names:
        if not name or name not in modules:
            raise NCLayersError(f"names: {name!r} is not a module of {type(model).__name__}")
    structures = output_structures(model, list(names), sample)
    pruned = copy.deepcopy(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        stand_in = PassThrough.like(modules[name], structures[name])
        setattr(pruned.get_submodule(parent_name), child, stand_in)
    return pruned


def rebind(blocks: Sequence[Block], model: nn.Module) -> list[Block]:
    """The same blocks (names, pooling) in another copy of the model, e.g. a pruned one:
    a removed block is tapped at its identity, which shows the previous block's output."""
    return [dataclasses.replace(b, module=model.get_submodule(b.path)) for b in blocks]


def finetune(
    model: nn.Module,
    batches,
    epochs: int,
    train_cfg,
    lr: float,
    progress: bool = False,
) -> list[float]:
    """Fine-tune in place for `epochs` at a constant `lr` with the run's optimiser
    settings (`train_cfg`: a TrainConfig); returns the mean training loss per epoch."""
    from nclayers.runtime import counter
    from nclayers.train import make_optimizer, train_epoch

    if epochs < 0:
        raise NCLayersError(f"prune.finetune_epochs={epochs}: use 0 (none) or a positive number")
    optimizer = make_optimizer(model, train_cfg.model_copy(update={"lr": lr}))
    amp = bool(getattr(train_cfg, "amp", False))
    losses = []
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        bar = counter(batches.samples_per_epoch, progress, f"fine-tune {epoch + 1}/{epochs}")
        try:
            loss_sum, _, seen = train_epoch(
                model, optimizer, batches, amp, train_cfg.label_smoothing, bar=bar
            )
        finally:
            if bar is not None:
                bar.close()
        losses.append(float(loss_sum) / seen)
    model.eval()
    return losses


def final_lr(train_cfg, steps_per_epoch: int | None = None) -> float:
    """The learning rate the run's schedule ended with: train.lr times the schedule's
    factor in its last epoch (its last step where it runs per step, train.warmup_steps).
    The default fine-tune lr: training goes on where it stopped, so the unpruned model
    fine-tuned alike stays where it was."""
    from nclayers.train import lr_factor, step_lr_factor

    tc = train_cfg
    if tc.warmup_steps and steps_per_epoch:
        last = tc.epochs * steps_per_epoch - 1
        return tc.lr * step_lr_factor(tc, last, steps_per_epoch)
    return tc.lr * lr_factor(tc, tc.epochs - 1)


# The unpruned model fine-tuned alike must keep its accuracy within this (2 points) of the
# model before the fine-tune: else it is no baseline, and the rows say so.
BASELINE_DROP = 0.02
BASELINE_FLAG = (
    "baseline wrecked: the unpruned model lost {points:.1f} points of test accuracy in the "
    "fine-tune (lr {lr:.3g}); every variant is judged against it: lower prune.finetune_lr, "
    "or leave it unset (the lr the run's schedule ended with)"
)


def baseline_note(table: Sequence[dict]) -> str | None:
    """The flag's sentence where a fine-tune lost the unpruned model more than
    BASELINE_DROP, else None."""
    for r in table:
        if r.get("variant") == NONE and r.get("baseline_flag"):
            points = 100 * r["baseline_drop"]
            return BASELINE_FLAG.format(points=points, lr=r.get("finetune_lr") or 0.0)
    return None


# ----------------------------------------------------------------------------- experiment
@dataclasses.dataclass
class _Setup:
    """What every variant of one experiment shares."""

    blocks: list[Block]
    test_batches: object
    num_classes: int
    train_batches: object
    train_cfg: object
    finetune_lr: float
    reference: object
    amp: bool
    run: str
    progress: bool
    perplexity: bool
    params: int


def _measure_variant(
    setup: _Setup, pruned: nn.Module, name: str, layers: list[int], epochs: int
) -> tuple[dict, Table]:
    """Fine-tune a pruned copy for `epochs` (0: not at all) and measure it: its summary
    row and the per-block rows of `analyze`."""
    losses = None
    if epochs:
        with seeded(0):  # every variant sees the same fine-tune randomness
            losses = finetune(
                pruned, setup.train_batches, epochs, setup.train_cfg, setup.finetune_lr,
                setup.progress,
            )  # fmt: skip
    table = analyze(
        pruned, setup.test_batches, setup.num_classes, rebind(setup.blocks, pruned),
        reference=setup.reference, amp=setup.amp, progress=setup.progress, run=setup.run,
        extra={"variant": name, "finetune_epochs": epochs},
    )  # fmt: skip
    acc = table.accuracy.get("clean", next(iter(table.accuracy.values())))
    last = table.where(view=table[0]["view"])[-1]
    is_random = name.startswith("random") and name[6:].isdigit()  # a random baseline
    blocks = setup.blocks
    row = {
        "run": setup.run, "variant": name, "kind": "random" if is_random else name,
        "seed": int(name[6:]) if is_random else None,
        "finetune_epochs": epochs, "n_removed": len(layers),
        "layers": " ".join(map(str, layers)),
        "blocks": " ".join(blocks[l - 1].name for l in layers),
        "params_removed": setup.params - sum(p.numel() for p in pruned.parameters()),
        "test_acc": acc, "nc1_last": last["nc1"], "nc2_last": last["nc2"],
        "finetune_loss": losses[-1] if epochs else None,
    }  # fmt: skip
    if setup.perplexity:
        from nclayers.lm import perplexity

        row["perplexity"] = perplexity(pruned, setup.test_batches, setup.amp)["perplexity"]
    return row, table


def prune_experiment(
    model: nn.Module,
    blocks: Sequence[Block],
    chosen: Sequence[int],
    test_batches,
    num_classes: int,
    *,
    label: str = "chosen",
    seeds: Sequence[int] = (0, 1, 2),
    baselines: Sequence[str] = ("last", "random"),
    criteria: Mapping[str, Sequence[int]] | None = None,
    train_batches=None,
    train_cfg=None,
    finetune_epochs: int = 0,
    finetune_lr: float | None = None,
    reference=None,
    amp: bool = False,
    run: str = "",
    progress: bool = False,
    perplexity: bool = False,
) -> tuple[Table, Table]:
    """Remove `chosen` blocks (1-based), the blocks of each of `criteria` (name -> blocks,
    e.g. {"block_influence": [...], "angular": [...]} from `layer_scores.choose_layers`)
    and the baselines' blocks, each from a fresh copy of `model`; measure test accuracy
    (for next-token batches: the model's next-token accuracy), per-block NC with
    `analyze` and, with `perplexity`, a causal LM's perplexity, before and (when
    `finetune_epochs` > 0) after a fine-tune of every variant, the unpruned one included.

    Returns (summary, layers): one summary row per (variant, fine-tune) with the removed
    blocks and test accuracy, and the per-block rows of `analyze` with `variant` and
    `finetune_epochs` columns. `reference`: a loader of the training split for the NCC
    accuracy (None: no NCC). `finetune_lr` None: `final_lr(train_cfg)`, the lr the run's
    schedule ended with. Fine-tuned rows carry `finetune_lr`, `baseline_drop` (the
    unpruned model's accuracy before minus after the same fine-tune) and `baseline_flag`
    (that drop above BASELINE_DROP: see `baseline_note`).
    """
    chosen = sorted(set(chosen))
    criteria = {k: sorted(set(v)) for k, v in (criteria or {}).items()}
    sample = head(next(iter(test_batches))[0], 2)
    no_data = finetune_epochs > 0 and (train_batches is None or train_cfg is None)
    _check_experiment(model, blocks, [chosen, *criteria.values()], sample, baselines, no_data)
    candidates = prunable_layers(model, blocks, sample)
    if finetune_epochs and finetune_lr is None:
        finetune_lr = final_lr(train_cfg, _steps(train_batches))
    sets = baseline_sets(candidates, len(chosen), seeds if "random" in baselines else ())
    if "last" not in baselines:
        del sets["last"]
    variants = {NONE: [], label: chosen, **criteria, **sets}
    setup = _Setup(
        list(blocks), test_batches, num_classes, train_batches, train_cfg, finetune_lr,
        reference, amp, run, progress, perplexity, sum(p.numel() for p in model.parameters()),
    )  # fmt: skip
    summary, layer_rows = [], []
    for name, layers in variants.items():
        if name != NONE and not layers and name != label:
            continue  # a baseline of nothing repeats the unpruned model
        pruned = prune_model(model, [blocks[l - 1].name for l in layers], sample)
        for epochs in [0] + ([finetune_epochs] if finetune_epochs else []):
            row, table = _measure_variant(setup, pruned, name, layers, epochs)
            summary.append(row)
            layer_rows.extend(table)
    base = {r["finetune_epochs"]: r for r in summary if r["variant"] == NONE}
    for r in summary:
        # Against the model as trained, and against the unpruned model given the same
        # fine-tune (which separates the effect of pruning from that of more training).
        r["acc_change"] = r["test_acc"] - base[0]["test_acc"]
        r["acc_change_same_finetune"] = r["test_acc"] - base[r["finetune_epochs"]]["test_acc"]
        r["nc1_last_ratio"] = r["nc1_last"] / base[0]["nc1_last"]
        tuned = r["finetune_epochs"] > 0
        drop = base[0]["test_acc"] - base[r["finetune_epochs"]]["test_acc"] if tuned else None
        r["finetune_lr"] = finetune_lr if tuned else None
        r["baseline_drop"] = drop
        r["baseline_flag"] = drop > BASELINE_DROP if tuned else None
    return Table(summary), Table(layer_rows)


def _check_experiment(model, blocks, layer_sets, sample, baselines, no_finetune_data) -> None:
    """Refuse, before any work, blocks that are not in forward order (the layer numbers
    refer to it), layers that cannot be removed, a fine-tune without its data, and
    unknown baselines."""
    if [b.name for b in forward_order(model, blocks, sample)] != [b.name for b in blocks]:
        raise NCLayersError(
            "blocks: not the layers as the model runs them (forward order, a shared block's "
            "calls apart), which the layer numbers refer to; pass find_blocks(model, ..., "
            "sample=...)"
        )
    for layers in layer_sets:
        check_prunable(model, blocks, layers, sample)
    if no_finetune_data:
        raise NCLayersError("finetune_epochs > 0 needs train_batches and train_cfg")
    unknown = set(baselines) - {"last", "random"}
    if unknown:
        raise NCLayersError(f"baselines: {sorted(unknown)} unknown; choose from ['last', 'random']")


def _steps(batches) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None


# ----------------------------------------------------------------------------- reading
def prune_summary(table: Sequence[dict]) -> str:
    """A few lines: each variant's test accuracy and, in brackets, its change against the
    unpruned model given the same fine-tune (as trained, on the no-fine-tune line); random
    baselines as mean +- standard deviation over their seeds. Where the rows hold a
    language model's perplexity, the same lines for it follow."""
    table = list(table)
    if not table:
        return "no pruning measured"
    lines = _summary_lines(table, "test_acc", "test accuracy", ".4f")
    if all(r.get("perplexity") is not None for r in table):
        lines += _summary_lines(table, "perplexity", "perplexity", ".3f")
    note = baseline_note(table)
    if note:
        lines.append(note)
    return "\n".join(lines)


def _summary_lines(table: list[dict], metric: str, what: str, fmt: str) -> list[str]:
    """One line per fine-tune: `metric` of each kind of removal (see prune_summary)."""
    lines = []
    for epochs in sorted({r["finetune_epochs"] for r in table}):
        rows = [r for r in table if r["finetune_epochs"] == epochs]
        none = [r for r in rows if r["variant"] == NONE]
        head = "without fine-tune" if epochs == 0 else f"after a {epochs}-epoch fine-tune"
        which = "unpruned" if epochs == 0 else "unpruned, fine-tuned alike"
        ref = f"{which} {none[0][metric]:{fmt}}" if none else f"{which}: not measured"
        parts = []
        for kind in variant_kinds(rows):
            group = [r for r in rows if r["kind"] == kind]
            k = group[0]["n_removed"]
            changes = [_change(r, none, metric) for r in group]
            values = [r[metric] for r in group]
            if len(group) > 1:
                sd = statistics.stdev(values)
                parts.append(
                    f"{kind} {k} blocks ({len(group)} seeds): {statistics.mean(values):{fmt}} "
                    f"+- {sd:{fmt}} ({statistics.mean(changes):+{fmt}})"
                )
            else:
                where = f" [{group[0]['layers']}]" if group[0]["layers"] else ""
                parts.append(f"{kind} {k} blocks{where}: {values[0]:{fmt}} ({changes[0]:+{fmt}})")
        lines.append(f"{what} {head} ({ref}): " + "; ".join(parts))
    return lines


def _change(row: dict, none: Sequence[dict], metric: str = "test_acc") -> float:
    if none:  # against the unpruned model that had the same fine-tune
        return row[metric] - none[0][metric]
    if metric == "test_acc":
        return row["acc_change"]
    return float("nan")


def variant_kinds(rows: Sequence[dict]) -> list[str]:
    """The kinds of removal in summary rows, in their order, without the unpruned one."""
    seen: dict[str, None] = {}
    for r in rows:
        if r["kind"] != NONE:
            seen.setdefault(r["kind"], None)
    return list(seen)
