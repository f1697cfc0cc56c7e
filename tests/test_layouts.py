"""The paper's figure layouts: which rows feed which panel, ratios, depth, styles, files."""

from __future__ import annotations

import itertools

import pytest

from nclayers.cli import main
from nclayers.report.figures import (
    LAYOUTS,
    Panel,
    curve_styles,
    layout_curves,
    plot_layout,
)
from nclayers.table import Table

MODELS = {"R18": 4, "R50": 6}  # label -> number of blocks
NOISE = {"r=0%": 0.0, "r=40%": 0.4}


def nc1_value(model: str, noise: float, split: str, view: str, layer: int, seed: int = 0) -> float:
    # Distinct, known values: the tests recompute what each panel must show.
    base = {"R18": 10.0, "R50": 20.0}[model] * (1 + noise) / layer + seed
    if view == "noisy":
        base *= 0.5 if layer > 2 else 2.0  # the noisy grouping is tighter in deep blocks
    return base + (0.25 if split == "test" else 0.0)


def tidy(seeds=(0,), probe: bool = False) -> Table:
    rows = []
    for model, depth in MODELS.items():
        for label, noise in NOISE.items():
            for seed in seeds:
                run = f"{model}-{label}-{seed}"
                for layer in range(1, depth + 1):
                    for split in ("train", "test"):
                        views = ["clean", "noisy"] if split == "train" and noise else ["clean"]
                        for view in views:
                            nc1 = nc1_value(model, noise, split, view, layer, seed)
                            row = {"run": run, "model": model, "noise": label, "split": split,
                                   "view": view, "layer": layer, "block": f"b{layer}",
                                   "nc1": nc1, "nc2": nc1 / 100}  # fmt: skip
                            if probe and split == "test":
                                row["probe_acc"] = 0.5 + layer / 100
                            rows.append(row)
    return Table(rows)


def test_noisy_layout_feeds_each_panel_the_right_rows():
    lay = layout_curves(tidy(), "noisy", rows="model", curves="noise")
    assert [p.metric for p in lay.panels] == ["nc1", "nc2", "ratio", "probe_acc"]
    assert lay.row_values == ["R18", "R50"] and lay.curve_values == ["r=0%", "r=40%"]
    # NC1 column: training images under the training labels: noisy view for noisy runs.
    xs, ys, _, _ = lay.curves[(0, 0)]["r=40%"]
    assert xs == [1, 2, 3, 4]
    assert ys == [nc1_value("R18", 0.4, "train", "noisy", l) for l in xs]
    xs, ys, _, _ = lay.curves[(1, 0)]["r=0%"]  # clean run: its clean view
    assert ys == [nc1_value("R50", 0.0, "train", "clean", l) for l in range(1, 7)]
    # Memorization ratio: NC1(true labels) / NC1(training labels), never the inverse.
    xs, ys, _, _ = lay.curves[(0, 2)]["r=40%"]
    want = [
        nc1_value("R18", 0.4, "train", "clean", l) / nc1_value("R18", 0.4, "train", "noisy", l)
        for l in xs
    ]
    assert ys == pytest.approx(want)
    assert ys[0] < 1 < ys[-1]  # the deep blocks memorize in this table
    assert "r=0%" not in lay.curves[(0, 2)]  # a clean run has no ratio
    # No probe column in the table: the panel is empty, not an error.
    assert lay.curves[(0, 3)] == {} and lay.curves[(1, 3)] == {}


def test_clean_layout_uses_the_test_split_and_relative_depth():
    lay = layout_curves(tidy(probe=True), "clean", rows="noise", curves="model", x="depth")
    xs, ys, _, _ = lay.curves[(0, 0)]["R50"]
    assert xs == pytest.approx([l / 6 for l in range(1, 7)])
    assert ys == [nc1_value("R50", 0.0, "test", "clean", l) for l in range(1, 7)]
    xs, ys, _, _ = lay.curves[(0, 1)]["R18"]
    assert xs == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert ys == pytest.approx([0.5 + l / 100 for l in range(1, 5)])


def test_runs_sharing_a_curve_are_averaged_with_their_range():
    lay = layout_curves(tidy(seeds=(0, 1, 2)), "clean-nc", curves="model")
    xs, ys, lo, hi = lay.curves[(0, 0)]["R18"]
    for k, l in enumerate(xs):  # both noise rates' clean rows, three seeds each
        vals = [nc1_value("R18", n, "test", "clean", l, s) for n in (0.0, 0.4) for s in (0, 1, 2)]
        assert ys[k] == pytest.approx(sum(vals) / len(vals))
        assert (lo[k], hi[k]) == (min(vals), max(vals))


def test_given_memorization_table_wins_over_the_views():
    memo = Table([{"run": "R18-r=40%-0", "layer": l, "ratio": 3.0 + l} for l in (1, 2)])
    lay = layout_curves(tidy(), "noisy", rows="model", curves="noise", memorization=memo)
    assert lay.curves[(0, 2)] == {"r=40%": ([1, 2], [4.0, 5.0], [4.0, 5.0], [4.0, 5.0])}
    assert lay.curves[(1, 2)] == {}


def test_scatter_of_probe_accuracy_against_nc1():
    lay = layout_curves(tidy(probe=True), "nc-vs-probe", curves="model")
    xs, ys, _, _ = lay.curves[(0, 0)]["R18"]
    pairs = sorted(
        (nc1_value("R18", n, "test", "clean", l), 0.5 + l / 100)
        for n in (0.0, 0.4)
        for l in range(1, 5)
    )
    assert xs == pytest.approx([p[0] for p in pairs])
    assert ys == pytest.approx([p[1] for p in pairs])


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match=r"rows='arch'.*columns are"):
        layout_curves(tidy(), "noisy", rows="arch")
    with pytest.raises(ValueError, match="layout='fancy'"):
        layout_curves(tidy(), "fancy")
    with pytest.raises(ValueError, match="x='width'"):
        layout_curves(tidy(), "clean", x="width")
    with pytest.raises(ValueError, match="empty"):
        layout_curves(Table(), "clean")


def test_styles_differ_in_marker_line_and_grey_level():
    styles = curve_styles(5)
    assert len({s["marker"] for s in styles}) == 5
    assert len({s["linestyle"] for s in styles}) == 4  # four line styles, then they repeat
    grey = [0.299 * s["color"][0] + 0.587 * s["color"][1] + 0.114 * s["color"][2] for s in styles]
    assert all(b - a > 0.08 for a, b in itertools.pairwise(grey))  # dark to light


def test_plot_layout_writes_png_and_pdf_even_with_an_empty_column(tmp_path):
    paths = plot_layout(tidy(), tmp_path / "fig3", "noisy", rows="model", curves="noise",
                        title="test")  # fmt: skip
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    custom = (Panel("cdnv_mean"), Panel("nc2"))
    assert plot_layout(tidy(), tmp_path / "c", custom, formats=("png",))[0].is_file()


def test_plot_verb_draws_a_layout_from_a_tidy_csv(tmp_path, capsys):
    csv = tidy(probe=True).to_csv(tmp_path / "layers.csv")
    rc = main(["plot", str(csv), "--layout", "noisy", "--rows", "model", "--curves", "noise",
               "--x", "depth"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "noisy.png" in out and (tmp_path / "noisy.pdf").is_file()
    assert main(["plot", str(csv), "--layout", "noisy", "--rows", "arch"]) == 2
    assert "rows='arch'" in capsys.readouterr().err


def test_layouts_cover_the_paper_columns():
    assert [p.metric for p in LAYOUTS["clean"]] == ["nc1", "probe_acc"]
    noisy = LAYOUTS["noisy"]
    assert [(p.split, p.view) for p in noisy[:2]] == [("train", "train"), ("train", "train")]
    assert noisy[3].split == "test" and noisy[3].view == "clean"


def test_corrupted_runs_show_the_inputs_they_were_trained_on():
    # A corrupted-input run measured on clean and corrupted training images (column input)
    # and on the clean test split: the training columns show the corrupted images.
    rows = []
    for layer in (1, 2):
        for inp, nc1 in (("clean", 5.0), ("corrupted", 2.0)):
            rows.append({"run": "g5", "split": "train", "view": "clean", "input": inp,
                         "layer": layer, "nc1": nc1 * layer, "nc2": 0.1})  # fmt: skip
        rows.append({"run": "g5", "split": "test", "view": "clean", "layer": layer,
                     "nc1": 9.0, "nc2": 0.1, "probe_acc": 0.5})  # fmt: skip
    memo = Table([{"run": "g5", "layer": 1, "ratio": 2.5}, {"run": "g5", "layer": 2, "ratio": 2.5}])
    lay = layout_curves(Table(rows), "noisy", memorization=memo)
    assert lay.curves[(0, 0)][None][1] == [2.0, 4.0]
    assert lay.curves[(0, 2)][None][1] == [2.5, 2.5]
    assert layout_curves(Table(rows), "clean").curves[(0, 0)][None][1] == [9.0, 9.0]


def test_log_axes_leave_the_panels_their_width():
    """Log panels (NC1, Δ) once made tight_layout reserve room for their raw mathtext tick
    labels: four panels shrank to 39 % of the figure's width. They fill most of it."""
    from nclayers.report.figures import _draw_layout, text_style

    with text_style(False):
        fig = _draw_layout(tidy(probe=True), "noisy", "model", "noise", "block", None,
                           "a title", [])  # fmt: skip
    widths = [ax.get_position().width for ax in fig.axes]
    assert len(widths) == 8 and sum(widths[:4]) > 0.7, widths
