"""Memorization ratio and memorization layers (paper Definitions 1 and 2).

Delta_l = nc1_clean_l / nc1_noisy_l on the same training images:

- label noise: grouped by their true labels (view "clean") and by the labels used in
  training (view "noisy"), `memorization_ratio`;
- corrupted inputs: the same images clean and corrupted, both under their true labels
  (rows with column input = "clean" / "corrupted"), `corruption_ratio`.

Layers with Delta_l > 1 are the memorization layers: there the grouping the model was
trained on is more collapsed than the true one. `memorized_fraction` says how much of the
label noise the model fitted, which tells whether Delta can be judged at all.
"""

from __future__ import annotations

import torch
from torch import nn

from nclayers.errors import NCLayersError
from nclayers.table import Table

CLEAN_INPUT, CORRUPTED_INPUT = "clean", "corrupted"  # values of the `input` column


def memorization_ratio(
    table: Table,
    split: str = "train",
    clean: str = "clean",
    noisy: str = "noisy",
    key: str = "view",
) -> Table:
    """Per layer Delta = nc1(clean) / nc1(noisy) from a layers table.

    key: the column that tells clean from noisy rows: "view" for label noise (one run,
    two labels views), "input" for corrupted inputs (one run, clean and corrupted images),
    or "run" for two runs. When the table also has the changed-sample views
    (changed_clean, changed_noisy), their NC1 values and ratio are added per layer.
    """
    rows = [r for r in table if r.get("split") == split]
    by: dict[tuple, dict] = {}
    for r in rows:
        by.setdefault((r.get("run") if key != "run" else None, r["layer"]), {})[r[key]] = r
    out = []
    for (run, layer), pair in sorted(by.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        if clean not in pair or noisy not in pair:
            continue
        ratio = pair[clean]["nc1"] / pair[noisy]["nc1"]
        row = {"layer": layer, "block": pair[clean]["block"], "split": split}
        if run is not None:
            row["run"] = run
        row.update(
            nc1_clean=pair[clean]["nc1"], nc1_noisy=pair[noisy]["nc1"],
            ratio=ratio, memorizing=ratio > 1.0,
        )  # fmt: skip
        if key == "view" and "changed_clean" in pair and "changed_noisy" in pair:
            a, b = pair["changed_clean"]["nc1"], pair["changed_noisy"]["nc1"]
            row.update(nc1_changed_clean=a, nc1_changed_noisy=b, ratio_changed=a / b)
        out.append(row)
    if not out:
        raise NCLayersError(
            f"no layer has both {key}={clean!r} and {key}={noisy!r} rows on split={split!r}; "
            "analyze the training split of a run trained with label noise (data.noise=...) "
            "or with corrupted inputs (data.corruption=...)"
        )
    return Table(out)


def corruption_ratio(table: Table, split: str = "train", view: str = "clean") -> Table:
    """Per layer Delta = nc1(clean images) / nc1(corrupted images), true labels.

    table: layers rows with an `input` column (clean / corrupted), e.g. two `analyze`
    passes over a corrupted data set and its `clean_twin()` with extra={"input": ...}.
    """
    rows = Table(r for r in table if r.get("view", view) == view)
    ratios = memorization_ratio(rows, split, CLEAN_INPUT, CORRUPTED_INPUT, key="input")
    for r in ratios:
        r["nc1_corrupted"] = r.pop("nc1_noisy")
        r["ratio"] = r.pop("ratio")  # keep both after the NC1 columns
        r["memorizing"] = r.pop("memorizing")
    return ratios


def memorization_layers(ratios: Table) -> list[int]:
    """1-based indices of the layers whose ratio exceeds 1."""
    return [r["layer"] for r in ratios if r["ratio"] > 1.0]


@torch.no_grad()
def memorized_fraction(
    model: nn.Module, dataset, batch_size: int = 500, amp: bool = True
) -> dict[str, float | int]:
    """How much label noise `model` fitted, on a training split with label noise.

    Returns memorized (train accuracy on the changed samples under their training
    labels), changed_true_acc (the same samples under their true labels), changed (their
    number) and unchanged_acc. NaN where a group is empty. The model runs in eval mode on
    its own device; one host sync at the end.
    """
    from nclayers.data import make_batches
    from nclayers.runtime import autocast
    from nclayers.taps import output_logits, run_model

    if "noisy" not in dataset.labels:
        raise NCLayersError(
            f"dataset {dataset.name} {dataset.split}: no 'noisy' labels view; the memorized "
            "fraction needs a training split with label noise (data.noise=...)"
        )
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    batches = make_batches(dataset, batch_size, device, views=["clean", "noisy"])
    # counts: changed, changed & pred == noisy, changed & pred == clean, unchanged, hits
    counts = torch.zeros(5, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            with autocast(device, amp):  # images, or a tokenised batch (transformers)
                pred = output_logits(run_model(model, x)).argmax(dim=1)
            changed = y["clean"] != y["noisy"]
            counts += torch.stack([
                changed.sum(),
                (changed & (pred == y["noisy"])).sum(),
                (changed & (pred == y["clean"])).sum(),
                (~changed).sum(),
                (~changed & (pred == y["clean"])).sum(),
            ])  # fmt: skip
    finally:
        model.train(was_training)
    n_changed, fit_noisy, fit_true, n_unchanged, hits = counts.tolist()

    def share(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return {
        "memorized": share(fit_noisy, n_changed),
        "changed_true_acc": share(fit_true, n_changed),
        "changed": n_changed,
        "unchanged_acc": share(hits, n_unchanged),
    }
