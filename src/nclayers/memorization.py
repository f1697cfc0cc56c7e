"""Memorization ratio and memorization layers (paper Definitions 1 and 2).

Delta_l = nc1_clean_l / nc1_noisy_l on the same images: grouped by their true labels
(clean) and by the labels used in training (noisy), or, for corrupted inputs, the same
images clean and corrupted under the true labels. Layers with Delta_l > 1 are the
memorization layers: there the noisy grouping is more collapsed than the true one.
"""

from __future__ import annotations

from nclayers.report.table import Table


def memorization_ratio(
    table: Table,
    split: str = "train",
    clean: str = "clean",
    noisy: str = "noisy",
    key: str = "view",
) -> Table:
    """Per layer Delta = nc1(clean) / nc1(noisy) from a layers table.

    key: the column that tells clean from noisy rows: "view" for label noise (one run,
    two labels views), or e.g. "run" for corrupted inputs (two runs, one view).
    """
    rows = [r for r in table if r.get("split") == split]
    by = {}
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
        out.append(row)
    if not out:
        raise ValueError(
            f"no layer has both {key}={clean!r} and {key}={noisy!r} rows on split={split!r}; "
            "analyze the training split of a run trained with label noise (data.noise=...)"
        )
    return Table(out)


def memorization_layers(ratios: Table) -> list[int]:
    """1-based indices of the layers whose ratio exceeds 1."""
    return [r["layer"] for r in ratios if r["ratio"] > 1.0]
