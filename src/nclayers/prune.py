"""Layer pruning: replace shape-preserving blocks by the identity and measure the cost.

The paper reads the NC1 plateau of deep models as the reason their middle blocks can be
removed; this module checks that claim rather than repeating it. A residual block
computes x + f(x) (then, in a ResNet, a ReLU of a non-negative input), a transformer block
x + attn(x) + mlp(x): replacing either by `nn.Identity` keeps x, which is only possible
where the block's output has the shape of its input (not a stage's first, downsampling
block). Library functions take models and tensors and know no folders:

- `io_shapes`, `prunable_layers`, `check_prunable`: which blocks keep their shape;
- `resolve_blocks("3,layer3.1", blocks)`: 1-based block indices from indices or names;
- `prune_model(model, names)`: a deep copy with those blocks replaced by the identity;
- `baseline_sets`: the same number of blocks chosen last, and at random (several seeds);
- `finetune`: a short fine-tune with nclayers.train's epoch loop;
- `prune_experiment`: accuracy and per-block NC of every variant, before and after the
  fine-tune; `prune_summary` says it in a few lines, `plot_prune` draws it.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from nclayers.analysis import analyze
from nclayers.errors import NCLayersError
from nclayers.table import Table
from nclayers.taps import Block, trace_blocks

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
    """1-based indices of the blocks whose output has the shape of their input."""
    return [
        i + 1
        for i, (x, y) in enumerate(io_shapes(model, blocks, sample))
        if x is not None and x == y
    ]


def check_prunable(
    model: nn.Module, blocks: Sequence[Block], layers: Sequence[int], sample: torch.Tensor
) -> None:
    """Refuse, naming them, the chosen blocks whose output shape differs from the input."""
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
def prune_model(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A deep copy of `model` with the named modules replaced by `nn.Identity()`; every
    other module, parameter and buffer is kept as it is."""
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    for name in names:
        if not name or name not in modules:
            raise NCLayersError(f"names: {name!r} is not a module of {type(model).__name__}")
        parent_name, _, child = name.rpartition(".")
        setattr(pruned.get_submodule(parent_name), child, nn.Identity())
    return pruned


def rebind(blocks: Sequence[Block], model: nn.Module) -> list[Block]:
    """The same blocks (names, pooling) in another copy of the model, e.g. a pruned one:
    a removed block is tapped at its identity, which shows the previous block's output."""
    return [dataclasses.replace(b, module=model.get_submodule(b.name)) for b in blocks]


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
    optimizer = make_optimizer(model, dataclasses.replace(train_cfg, lr=lr))
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


# ----------------------------------------------------------------------------- experiment
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
    train_batches=None,
    train_cfg=None,
    finetune_epochs: int = 0,
    finetune_lr: float = 0.01,
    reference=None,
    amp: bool = False,
    run: str = "",
    progress: bool = False,
) -> tuple[Table, Table]:
    """Remove `chosen` blocks (1-based) and the baselines' blocks, each from a fresh copy
    of `model`; measure test accuracy and per-block NC with `analyze`, before and (when
    `finetune_epochs` > 0) after a fine-tune of every variant, the unpruned one included.

    Returns (summary, layers): one summary row per (variant, fine-tune) with the removed
    blocks and test accuracy, and the per-block rows of `analyze` with `variant` and
    `finetune_epochs` columns. `reference`: a loader of the training split for the NCC
    accuracy (None: no NCC).
    """
    chosen = sorted(set(chosen))
    sample = next(iter(test_batches))[0][:2]
    check_prunable(model, blocks, chosen, sample)
    candidates = prunable_layers(model, blocks, sample)
    if finetune_epochs and (train_batches is None or train_cfg is None):
        raise NCLayersError("finetune_epochs > 0 needs train_batches and train_cfg")
    unknown = set(baselines) - {"last", "random"}
    if unknown:
        raise NCLayersError(f"baselines: {sorted(unknown)} unknown; choose from ['last', 'random']")
    sets = baseline_sets(candidates, len(chosen), seeds if "random" in baselines else ())
    if "last" not in baselines:
        del sets["last"]
    variants = {NONE: [], label: chosen, **sets}
    params = sum(p.numel() for p in model.parameters())
    summary, layer_rows = [], []
    rounds = [0] + ([finetune_epochs] if finetune_epochs else [])
    for name, layers in variants.items():
        if name != NONE and not layers and name != label:
            continue  # a baseline of nothing repeats the unpruned model
        pruned = prune_model(model, [blocks[l - 1].name for l in layers])
        for epochs in rounds:
            if epochs:
                torch.manual_seed(0)  # every variant sees the same fine-tune randomness
                losses = finetune(pruned, train_batches, epochs, train_cfg, finetune_lr, progress)
            table = analyze(
                pruned, test_batches, num_classes, rebind(blocks, pruned), reference=reference,
                amp=amp, progress=progress, run=run,
                extra={"variant": name, "finetune_epochs": epochs},
            )  # fmt: skip
            acc = table.accuracy.get("clean", next(iter(table.accuracy.values())))
            last = table.where(view=table[0]["view"])[-1]
            kind = "random" if name.startswith("random") else name
            summary.append({
                "run": run, "variant": name, "kind": kind,
                "seed": int(name[6:]) if kind == "random" else None,
                "finetune_epochs": epochs, "n_removed": len(layers),
                "layers": " ".join(map(str, layers)),
                "blocks": " ".join(blocks[l - 1].name for l in layers),
                "params_removed": params - sum(p.numel() for p in pruned.parameters()),
                "test_acc": acc, "nc1_last": last["nc1"], "nc2_last": last["nc2"],
                "finetune_loss": losses[-1] if epochs else None,
            })  # fmt: skip
            layer_rows.extend(table)
    base = {r["finetune_epochs"]: r for r in summary if r["variant"] == NONE}
    for r in summary:
        # Against the model as trained, and against the unpruned model given the same
        # fine-tune (which separates the effect of pruning from that of more training).
        r["acc_change"] = r["test_acc"] - base[0]["test_acc"]
        r["acc_change_same_finetune"] = r["test_acc"] - base[r["finetune_epochs"]]["test_acc"]
        r["nc1_last_ratio"] = r["nc1_last"] / base[0]["nc1_last"]
    return Table(summary), Table(layer_rows)


# ----------------------------------------------------------------------------- reading
def prune_summary(table: Sequence[dict]) -> str:
    """A few lines: each variant's test accuracy and, in brackets, its change against the
    unpruned model given the same fine-tune (as trained, on the no-fine-tune line); random
    baselines as mean +- standard deviation over their seeds."""
    table = list(table)
    if not table:
        return "no pruning measured"
    lines = []
    for epochs in sorted({r["finetune_epochs"] for r in table}):
        rows = [r for r in table if r["finetune_epochs"] == epochs]
        none = [r for r in rows if r["variant"] == NONE]
        head = "without fine-tune" if epochs == 0 else f"after a {epochs}-epoch fine-tune"
        which = "unpruned" if epochs == 0 else "unpruned, fine-tuned alike"
        ref = f"{which} {none[0]['test_acc']:.4f}" if none else f"{which}: not measured"
        parts = []
        for kind in _kinds(rows):
            group = [r for r in rows if r["kind"] == kind]
            k = group[0]["n_removed"]
            changes = [_change(r, none) for r in group]
            accs = [r["test_acc"] for r in group]
            if len(group) > 1:
                sd = statistics.stdev(accs)
                parts.append(
                    f"{kind} {k} blocks ({len(group)} seeds): {statistics.mean(accs):.4f} "
                    f"+- {sd:.4f} ({statistics.mean(changes):+.4f})"
                )
            else:
                where = f" [{group[0]['layers']}]" if group[0]["layers"] else ""
                parts.append(f"{kind} {k} blocks{where}: {accs[0]:.4f} ({changes[0]:+.4f})")
        lines.append(f"test accuracy {head} ({ref}): " + "; ".join(parts))
    return "\n".join(lines)


def _change(row: dict, none: Sequence[dict]) -> float:
    if none:  # against the unpruned model that had the same fine-tune
        return row["test_acc"] - none[0]["test_acc"]
    return row["acc_change"]


def _kinds(rows: Sequence[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        if r["kind"] != NONE:
            seen.setdefault(r["kind"], None)
    return list(seen)


def plot_prune(
    table: Sequence[dict], path: str | Path, layers: Sequence[dict] | None = None
) -> Path:
    """Test accuracy of each kind of removal, without and with the fine-tune; random
    baselines as mean with their seeds' range. Given the per-block rows (`layers`), a
    second panel draws NC1 per block of the unpruned, chosen and last variants."""
    from nclayers.report.figures import _pyplot, save_figure

    plt = _pyplot()
    table = list(table)
    kinds = [NONE, *_kinds(table)]
    rounds = sorted({r["finetune_epochs"] for r in table})
    if layers:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
        _plot_nc1(ax2, layers, [k for k in kinds if not k.startswith("random")], rounds)
    else:
        fig, ax = plt.subplots(figsize=(6.5, 4))
    width = 0.8 / len(rounds)
    for j, epochs in enumerate(rounds):
        means, lows, highs = [], [], []
        for kind in kinds:
            accs = [
                r["test_acc"] for r in table if r["kind"] == kind and r["finetune_epochs"] == epochs
            ]
            m = statistics.mean(accs) if accs else float("nan")
            means.append(m)
            lows.append(m - min(accs) if accs else 0.0)
            highs.append(max(accs) - m if accs else 0.0)
        xs = [i + (j - (len(rounds) - 1) / 2) * width for i in range(len(kinds))]
        label = "no fine-tune" if epochs == 0 else f"{epochs}-epoch fine-tune"
        ax.bar(xs, means, width, yerr=[lows, highs], capsize=3, label=label)
    k = max((r["n_removed"] for r in table), default=0)
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels([f"{kd}" for kd in kinds])
    ax.set_ylabel("test accuracy")
    ax.set_title(f"removing {k} blocks by identity", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def _plot_nc1(ax, layers: Sequence[dict], variants: Sequence[str], rounds: Sequence[int]) -> None:
    for variant in variants:
        for epochs in rounds:
            pts = sorted(
                (r["layer"], r["nc1"])
                for r in layers
                if r.get("variant") == variant and r.get("finetune_epochs") == epochs
            )
            if pts:
                style = "o-" if epochs == 0 else "x--"
                label = variant + ("" if epochs == 0 else f" +{epochs} ep")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("block index (a removed block shows its input)")
    ax.set_ylabel("NC1 (sum of CDNV)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
