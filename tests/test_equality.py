"""Enhancement, the law-of-separation fit, BIC model choice and the plateau rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nclayers.equality import (
    analyze_equality,
    compare_fits,
    enhancement,
    find_plateau,
    fit_geometric,
    fit_plateau,
    format_equality,
    summary_row,
)
from nclayers.report.equality_figures import plot_equality
from nclayers.table import Table


def _geometric_curve(n=16, ratio=0.8, noise=0.03, seed=0):
    rng = np.random.default_rng(seed)
    layers = np.arange(1, n + 1)
    return 50.0 * ratio**layers * np.exp(noise * rng.standard_normal(n))


def _plateau_curve(n=16, start=5, end=11, noise=0.03, seed=0):
    """log NC1 falls by 0.5 a block up to `start`, stays flat to `end`, then falls by 0.6."""
    rng = np.random.default_rng(seed)
    x = np.arange(1, n + 1, dtype=float)
    log = 4.0 + 0.5 * np.maximum(start - x, 0) - 0.6 * np.maximum(x - end, 0)
    return np.exp(log + noise * rng.standard_normal(n))


def _layers_table(nc1, nc2=None, probe=None, run="r", split="test", view="clean", start=1):
    rows = []
    for i, v in enumerate(nc1):
        row = {"run": run, "split": split, "view": view, "layer": start + i,
               "block": f"b{start + i}", "nc1": float(v)}  # fmt: skip
        if nc2 is not None:
            row["nc2"] = float(nc2[i])
        if probe is not None:
            row["probe_acc"] = probe[i]
        rows.append(row)
    return Table(rows)


# ----------------------------------------------------------------------------- enhancement
def test_enhancement_by_hand_and_its_sign():
    table = _layers_table([8.0, 4.0, 4.0, 1.0], nc2=[1.0, 0.5, 1.0, 0.25],
                          probe=[0.3, 0.5, None, 0.9])  # fmt: skip
    rows = enhancement(table)
    assert [r["e_nc1"] for r in rows] == [None, math.log(2), 0.0, math.log(4)]
    assert [r["e_nc2"] for r in rows] == [None, math.log(2), -math.log(2), math.log(4)]
    # Compression (NC1 falling) is a positive enhancement: the ratio is previous / current.
    assert rows[1]["e_nc1"] > 0
    gains = [r["probe_gain"] for r in rows]
    assert gains[0] is None and gains[1] == pytest.approx(0.2) and gains[2] is None
    assert gains[3] is None  # the previous block has no probe
    assert table[0].get("e_nc1") is None  # the input table is untouched


def test_enhancement_uses_a_stem_row_and_keeps_curves_apart():
    stem = _layers_table([16.0, 8.0, 2.0], start=0)
    other = _layers_table([1.0, 10.0], run="other")
    rows = enhancement(Table(list(other) + list(stem)))
    by = {(r["run"], r["layer"]): r["e_nc1"] for r in rows}
    assert by[("r", 1)] == pytest.approx(math.log(2))  # block 1 against the stem
    assert by[("r", 2)] == pytest.approx(math.log(4))
    assert by[("other", 1)] is None  # no stem and no borrowing from run "r"
    assert by[("other", 2)] == pytest.approx(math.log(0.1))


def test_enhancement_needs_layer_and_nc1():
    with pytest.raises(ValueError, match="'layer' and 'nc1'"):
        enhancement([{"layer": 1, "nc2": 0.3}])


# ----------------------------------------------------------------------------- fits
def test_geometric_fit_matches_an_independent_least_squares():
    nc1 = _geometric_curve(ratio=0.8)
    fit = fit_geometric(nc1)
    x = np.arange(1, 17, dtype=np.float64)
    slope, intercept = np.polyfit(x, np.log(nc1), 1)
    assert fit.slope == pytest.approx(slope, rel=1e-10)
    assert fit.intercept == pytest.approx(intercept, rel=1e-10)
    resid = np.log(nc1) - (intercept + slope * x)
    r2 = 1 - (resid**2).sum() / ((np.log(nc1) - np.log(nc1).mean()) ** 2).sum()
    assert fit.r2 == pytest.approx(r2, rel=1e-10)
    np.testing.assert_allclose(fit.residuals, resid, atol=1e-12)
    assert fit.ratio == pytest.approx(0.8, abs=0.01)  # the planted ratio per block
    # Against relative depth l/L the slope is L times the per-block one.
    slope_depth = np.polyfit(x / 16, np.log(nc1), 1)[0]
    assert fit.slope_per_depth == pytest.approx(slope_depth, rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bic_picks_geometric_decay_when_planted(seed):
    cmp = compare_fits(_geometric_curve(seed=seed))
    assert cmp.preferred == "geometric"
    assert cmp.delta_bic < 2.0
    assert cmp.geometric.r2 > 0.99


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plateau_fit_recovers_a_planted_plateau_and_bic_picks_it(seed):
    nc1 = _plateau_curve(start=5, end=11, seed=seed)
    plat = fit_plateau(nc1)
    assert (plat.start, plat.end) == (5.0, 11.0)
    assert plat.plateau_layers == [6, 7, 8, 9, 10, 11]
    assert plat.slope_in == pytest.approx(-0.5, abs=0.05)
    assert plat.slope_out == pytest.approx(-0.6, abs=0.05)
    cmp = compare_fits(nc1)
    assert cmp.preferred == "plateau"
    assert cmp.delta_bic > 10
    assert "6-11" in cmp.verdict


def test_plateau_fit_is_the_exhaustive_least_squares_optimum():
    rng = np.random.default_rng(5)
    nc1 = np.exp(rng.standard_normal(9))  # any curve: the search must find the best pair
    plat = fit_plateau(nc1)
    x, y = np.arange(1, 10, dtype=float), np.log(nc1)
    best = math.inf
    for s in range(2, 9):
        for e in range(s + 1, 9):
            design = np.stack([np.ones(9), np.minimum(x - s, 0), np.maximum(x - e, 0)], 1)
            coef = np.linalg.lstsq(design, y, rcond=None)[0]
            best = min(best, float(((y - design @ coef) ** 2).sum()))
    assert plat.rss == pytest.approx(best, rel=1e-9)


def test_noise_free_curves_pick_the_simpler_model():
    cmp = compare_fits(10.0 * 0.7 ** np.arange(1, 13))
    assert cmp.preferred == "geometric" and math.isfinite(cmp.delta_bic)


def test_a_rising_then_flat_curve_is_not_called_a_plateau():
    x = np.arange(1, 15, dtype=float)
    nc1 = np.exp(0.5 * np.minimum(x, 5) + 0.01 * np.random.default_rng(0).standard_normal(14))
    cmp = compare_fits(nc1)
    assert cmp.preferred == "geometric"
    assert "not decay-flat-decay" in cmp.verdict


def test_fits_refuse_bad_input():
    with pytest.raises(ValueError, match="too few to fit a decay"):
        fit_geometric([3.0, 2.0])
    with pytest.raises(ValueError, match="too few to fit a plateau"):
        fit_plateau([5.0, 4.0, 3.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="finite and positive"):
        fit_geometric([3.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="increase strictly"):
        fit_geometric([3.0, 2.0, 1.0], x=[1, 3, 2])
    cmp = compare_fits([5.0, 4.0, 3.0, 2.0])  # fits, but says why there is no comparison
    assert cmp.plateau is None and "at least 6" in cmp.verdict


# ----------------------------------------------------------------------------- plateau rule
def test_plateau_rule_by_hand():
    layers = [2, 3, 4, 5, 6, 7, 8, 9]
    e = [1.0, 1.0, 0.1, 0.2, -0.1, 1.2, 0.1, 1.0]  # mean 0.5625, threshold 0.28125
    p = find_plateau(layers, e, fraction=0.5, min_run=2)
    assert p.mean_enhancement == pytest.approx(0.5625)
    assert p.threshold == pytest.approx(0.28125)
    assert p.runs == [[4, 5, 6]]  # block 8 alone is shorter than min_run
    assert p.layers == [4, 5, 6]
    assert "0.5 x mean(e)" in p.rule and "0.2812" in p.rule
    assert find_plateau(layers, e, fraction=0.5, min_run=1).runs == [[4, 5, 6], [8]]
    # A gap in the layer numbers breaks a run.
    assert find_plateau([2, 3, 5, 6], [0.0, 0.0, 0.0, 2.0], min_run=2).runs == [[2, 3]]


def test_plateau_rule_edge_cases():
    p = find_plateau([2, 3, 4], [-1.0, -0.5, 0.2])
    assert p.layers == [] and "no plateau" in p.rule
    with pytest.raises(ValueError, match=r"fraction=1\.5"):
        find_plateau([2, 3], [1.0, 1.0], fraction=1.5)
    with pytest.raises(ValueError, match="min_run=0"):
        find_plateau([2, 3], [1.0, 1.0], min_run=0)
    with pytest.raises(ValueError, match="too few"):
        find_plateau([1, 2], [None, 1.0])


# ----------------------------------------------------------------------------- whole tables
def test_analyze_equality_per_curve(tmp_path):
    plateau = _layers_table(_plateau_curve(), run="deep")
    geometric = _layers_table(_geometric_curve(), run="shallow")
    train_rows = _layers_table(_geometric_curve(), run="deep", split="train")
    reports = analyze_equality(Table(list(plateau) + list(geometric) + list(train_rows)))
    by = {r.key["run"]: r for r in reports}
    assert set(by) == {"deep", "shallow"}  # the train split is left out
    assert by["deep"].fit.preferred == "plateau"
    assert by["shallow"].fit.preferred == "geometric"
    assert by["shallow"].plateau.layers == []
    # The planted flat blocks 6..11 are the rule's candidates too.
    assert by["deep"].plateau.layers == [6, 7, 8, 9, 10, 11]
    rows = by["deep"].rows
    assert [r["redundant"] for r in rows].count(True) == 6
    resid = np.array([r["resid_geometric"] for r in rows])
    np.testing.assert_allclose(resid, by["deep"].fit.geometric.residuals)
    text = format_equality(by["deep"])
    assert "candidate redundant blocks: 6-11" in text and "plateau rule:" in text
    assert summary_row(by["deep"])["redundant_blocks"] == [6, 7, 8, 9, 10, 11]
    assert plot_equality(by["deep"], tmp_path / "eq.png").stat().st_size > 0


def test_analyze_equality_names_what_the_table_holds():
    with pytest.raises(ValueError, match="no rows with split='test'"):
        analyze_equality(_layers_table(_geometric_curve(), split="train"))


# ----------------------------------------------------------------------------- job and CLI
def test_equality_verb_on_a_sweep_of_run_folders(tmp_path, capsys):
    from nclayers.cli import main

    for name, nc1 in (("deep", _plateau_curve()), ("shallow", _geometric_curve())):
        folder = tmp_path / "sweep" / name
        folder.mkdir(parents=True)
        _layers_table(nc1, run=name).to_csv(folder / "layers.csv")
    Table([{"variant": "none", "kind": "none", "finetune_epochs": 0, "n_removed": 0,
            "layers": "", "test_acc": 0.9, "acc_change": 0.0},
           {"variant": "plateau", "kind": "plateau", "finetune_epochs": 0, "n_removed": 2,
            "layers": "7 8", "test_acc": 0.85, "acc_change": -0.05}],
          ).to_csv(tmp_path / "sweep" / "deep" / "prune.csv")  # fmt: skip
    rc = main(["equality", str(tmp_path / "sweep"), "equality.plateau_min_run=3"])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.count("== run=deep") == 1 and out.count("== run=shallow") == 1
    assert "in runs of >= 3 consecutive blocks" in out
    assert "plateau: decay, flat over blocks 6-11" in out
    assert "plateau 2 blocks [7 8]: 0.8500 (-0.0500)" in out
    deep = tmp_path / "sweep" / "deep"
    rows = Table.from_csv(deep / "equality.csv")
    assert [r["layer"] for r in rows if r["redundant"] is True] == list(range(6, 12))
    assert (deep / "equality.png").is_file() and (deep / "equality.json").is_file()
    assert main(["equality", str(tmp_path / "nothing")]) == 2
    assert "neither a layers.csv nor" in capsys.readouterr().err


def test_equality_of_another_split_writes_beside_the_test_split(tmp_path):
    from nclayers.cli import main

    folder = tmp_path / "run"
    folder.mkdir()
    both = Table(
        [*_layers_table(_plateau_curve()), *_layers_table(_geometric_curve(), split="train")]
    )
    both.to_csv(folder / "layers.csv")
    assert main(["equality", str(folder), "--no-plot"]) == 0
    assert main(["equality", str(folder), "equality.split=train", "--no-plot"]) == 0
    test_rows = Table.from_csv(folder / "equality.csv")
    train_rows = Table.from_csv(folder / "equality-train.csv")
    # The plateau curve is on test, the geometric one on train: neither file overwrote the other.
    assert any(r["redundant"] is True for r in test_rows)
    assert test_rows.column("nc1") == _plateau_curve().tolist()
    assert train_rows.column("nc1") == _geometric_curve().tolist()
