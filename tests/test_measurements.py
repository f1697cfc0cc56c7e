"""Every row says what it measured: measurements kept per stage and settings, rows joined
on the block they name, one writer per run folder, figures drawn from the rows shown,
sweeps that keep their own measurements."""

from __future__ import annotations

import base64
import re
import shutil

import pytest
import yaml

from nclayers.cli import main
from nclayers.jobs import RunFolder, analyze_job, probe_job
from nclayers.jobs.folder import LAYERS, MEMORIZATION, STAGES
from nclayers.jobs.sweep import load_sweep
from nclayers.table import Table
from tinyruns import TINY, trained_run

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = [f"{k}={v}" for k, v in TINY.items() if not k.startswith("train.track")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_run(tmp_path_factory, "measured", [*ARGS, "train.epochs=1"])


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    return trained_run(tmp_path_factory, "noisy", [*ARGS, "train.epochs=1", "data.noise=0.4"])


def copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def by_block(rows: Table, column: str) -> dict:
    return {r["block"]: r[column] for r in rows if r.get(column) is not None}


def test_a_row_never_shows_another_blocks_value(trained, tmp_path):
    """Re-analysing only layer4.* after a full analyze and probe: the row of layer1.0 held
    layer4.0's NC1 (rows were merged by layer index). Now each row shows only values
    measured on the block it names, at its position in forward order."""
    run = copy(trained, tmp_path)
    folder = RunFolder(run)
    cfg = folder.config()
    analyze_job(cfg, folder, progress=False)
    probed = probe_job(cfg.updated({"probe.epochs": 1}), folder, progress=False)
    again = analyze_job(cfg.updated({"model.blocks": "layer4.*"}), folder, progress=False)
    layers = Table.from_csv(run / LAYERS).where(split="test", view="clean")
    nc1 = by_block(again.table.where(split="test", view="clean"), "nc1")
    assert set(nc1) == {"layer4.0", "layer4.1"}
    assert by_block(layers, "nc1") == nc1
    assert by_block(layers, "probe_acc") == by_block(probed, "probe_acc")
    assert len(by_block(layers, "probe_acc")) == 8
    assert {r["block"]: r["layer"] for r in layers}["layer4.0"] == 7
    assert len({r["block"] for r in layers}) == len(layers) == 8
    # The full analysis is kept as a measurement of its own settings.
    assert len(list((run / "measurements").glob("analyze-*.csv"))) == 2


def test_probing_one_block_fills_only_its_row(trained, tmp_path):
    """`probe RUN model.blocks=layer4.1` wrote layer4.1's accuracy into layer1.0's row."""
    run = copy(trained, tmp_path)
    folder = RunFolder(run)
    cfg = folder.config()
    analyze_job(cfg, folder, progress=False)
    probed = probe_job(cfg.updated({"model.blocks": "layer4.1"}), folder, progress=False)
    layers = Table.from_csv(run / LAYERS)
    assert by_block(layers, "probe_acc") == by_block(probed, "probe_acc")
    assert list(by_block(layers, "probe_acc")) == ["layer4.1"]


def test_a_run_name_override_keeps_one_row_per_block(trained, tmp_path):
    """`analyze RUN run=foo` after a probe split the table into probe-only and
    analyze-only rows, after which `equality RUN` failed on NaN."""
    run = str(copy(trained, tmp_path))
    assert main(["analyze", run, "-q"]) == 0
    assert main(["probe", run, "-q"]) == 0
    assert main(["analyze", run, "run=foo", "-q"]) == 0
    test = Table.from_csv(f"{run}/{LAYERS}").where(split="test", view="clean")
    assert len(test) == 8 and all(r["nc1"] and r["probe_acc"] is not None for r in test)
    assert main(["equality", run, "-q"]) == 0


def test_measuring_again_with_the_same_settings_replaces_only_that_measurement(trained, tmp_path):
    run = copy(trained, tmp_path)
    assert main(["analyze", str(run), "-q"]) == 0
    assert main(["analyze", str(run), "data.test_subset=50", "-q"]) == 0
    assert main(["analyze", str(run), "data.test_subset=50", "-q"]) == 0
    files = sorted((run / "measurements").glob("analyze-*.csv"))
    assert len(files) == 2
    ns = sorted({r["n"] for f in files for r in Table.from_csv(f).where(split="test")})
    assert ns == [50, 100]
    assert {r["n"] for r in Table.from_csv(run / LAYERS).where(split="test")} == {50}


def test_memorization_of_a_run_folders_layers_csv_keeps_the_stage_files(noisy, tmp_path):
    """`nclayers memorization RUN/layers.csv` overwrote the stage's memorization.csv with a
    plain write; the next `report RUN` refused the run as damaged."""
    run = copy(noisy, tmp_path)
    assert main(["analyze", str(run), "analyze.split=train", "-q"]) == 0
    assert main(["memorization", str(run), "-q"]) == 0
    before = (run / MEMORIZATION).read_bytes()
    assert main(["memorization", str(run / LAYERS)]) == 0
    assert (run / MEMORIZATION).read_bytes() == before
    assert (run / "memorization-from-layers.csv").is_file()
    assert main(["report", str(run)]) == 0
    assert main(["analyze", str(run), "-q"]) == 0


def inlined(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def test_figures_follow_the_rows_the_report_shows(trained, tmp_path):
    """After the quick tour, re-analysing with data.test_subset=50 and reporting again
    embedded the very same nc1.png / nc2.png next to a table of the new numbers."""
    run = copy(trained, tmp_path)
    assert main(["analyze", str(run), "-q"]) == 0
    assert main(["plot", str(run / LAYERS), "--split", "test"]) == 0
    assert (run / "nc1.png").is_file()
    assert main(["report", str(run)]) == 0
    first = inlined((run / "report.html").read_text())
    assert (run / "nc1.png").read_bytes() not in first  # plot's files are not the report's
    assert main(["analyze", str(run), "data.test_subset=50", "-q"]) == 0
    assert main(["report", str(run)]) == 0
    second = inlined((run / "report.html").read_text())
    assert second and not set(first) & set(second)
    assert "out of date" not in (run / "report.html").read_text()


def test_training_further_drops_values_of_the_old_weights(trained, tmp_path):
    run = copy(trained, tmp_path)
    assert main(["analyze", str(run), "-q"]) == 0
    assert main(["train", str(run), "--resume", "train.epochs=2", "-q"]) == 0
    assert not (run / LAYERS).exists()
    assert main(["analyze", str(run), "-q"]) == 0
    assert main(["report", str(run)]) == 0
    assert "out of date" not in (run / "report.html").read_text()


def test_an_older_layout_is_refused_in_one_line_and_upgraded(trained, tmp_path, capsys):
    run = copy(trained, tmp_path)
    assert main(["analyze", str(run), "-q"]) == 0
    # The previous layout: stages.json records without a measurement key.
    folder = RunFolder(run)
    stages = folder.stages()
    stages["analyze"].pop("key")
    folder.write_json(STAGES, stages)
    shutil.rmtree(run / "measurements")
    folder.remove("measurements.json")
    capsys.readouterr()
    assert main(["probe", str(run), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"nclayers upgrade {run}" in err[0]
    assert main(["upgrade", str(run)]) == 0
    assert RunFolder(run).status("analyze", RunFolder(run).config()) == "done"
    assert main(["probe", str(run), "-q"]) == 0


def test_an_older_config_with_one_probe_lr_is_refused_and_upgraded(trained, tmp_path, capsys):
    """Older nclayers wrote `probe: {lr: 0.1}`; upgrade turns it into the grid of that one
    lr, which is what measured the folder's probe."""
    run = copy(trained, tmp_path)
    folder = RunFolder(run)
    data = yaml.safe_load((run / "config.yaml").read_text())
    data["probe"]["lr"] = 0.05
    del data["probe"]["lrs"]
    folder.write("config.yaml", yaml.safe_dump(data, sort_keys=False))  # as nclayers wrote it
    capsys.readouterr()
    assert main(["analyze", str(run), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "probe.lrs=[0.05]" in err[0] and "nclayers upgrade" in err[0]
    assert main(["upgrade", str(run)]) == 0
    assert RunFolder(run).config().probe.lrs == [0.05]
    assert main(["analyze", str(run), "-q"]) == 0


# ----------------------------------------------------------------------------- sweeps
def sweep_file(path, root, **spec):
    doc = {"name": path.stem, "root": str(root), "config": {**TINY, "train.epochs": 1},
           "stages": ["train", "analyze"], "report": False, **spec}  # fmt: skip
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_two_sweeps_measuring_one_run_keep_their_own_numbers(tmp_path):
    a = sweep_file(tmp_path / "a.yaml", tmp_path, config={**TINY, "train.epochs": 1,
                                                           "data.test_subset": 50})  # fmt: skip
    b = sweep_file(tmp_path / "b.yaml", tmp_path, config={**TINY, "train.epochs": 1,
                                                           "data.test_subset": 80})  # fmt: skip
    assert main(["sweep", str(a), "-q"]) == 0
    assert main(["sweep", str(b), "-q"]) == 0
    assert load_sweep(a).runs[0].folder == load_sweep(b).runs[0].folder  # one run
    for path, n in ((a, 50), (b, 80)):
        assert main(["sweep", str(path), "--collect", "-q"]) == 0
        layers = Table.from_csv(tmp_path / path.stem / LAYERS).where(split="test")
        assert {r["n"] for r in layers} == {n}
        runs = Table.from_csv(tmp_path / path.stem / "runs.csv")
        assert runs[0]["analyze"] == "done"


@pytest.mark.parametrize(
    "axes",
    [{"data.test_subset": [50, 80]}, {"tapped": [{"label": "early", "model.blocks": "layer1.*"},
                                                 {"label": "late", "model.blocks": "layer4.*"}]}],
    ids=["test_subset", "blocks"],
)  # fmt: skip
def test_an_axis_over_measurement_settings_trains_once(tmp_path, axes):
    axis = next(iter(axes))
    path = sweep_file(tmp_path / "m.yaml", tmp_path, axes=axes,
                      figure={"layout": "clean", "curves": axis})  # fmt: skip
    assert main(["sweep", str(path), "-q"]) == 0
    sweep = load_sweep(path)
    assert len({r.folder for r in sweep.runs}) == 1
    assert len(list((tmp_path / "runs").iterdir())) == 1
    layers = Table.from_csv(tmp_path / "m" / LAYERS).where(split="test")
    labels = {str(v if not isinstance(v, dict) else v["label"]) for v in axes[axis]}
    assert {str(r[axis]) for r in layers} == labels
    assert (tmp_path / "m" / "m.png").is_file()


@pytest.mark.parametrize("axis", ["split", "view", "layer", "block", "dim", "n", "run"])
def test_an_axis_named_like_a_data_column_is_refused(tmp_path, axis):
    path = sweep_file(tmp_path / "c.yaml", tmp_path,
                      axes={axis: [{"label": "a", "train.seed": 0}]})  # fmt: skip
    with pytest.raises(ValueError, match=f"axis {axis!r}"):
        load_sweep(path)


def test_prune_runs_after_the_equality_it_reads():
    from nclayers.jobs.sweep import STAGE_ORDER

    assert STAGE_ORDER.index("equality") < STAGE_ORDER.index("prune")


def test_a_sweep_gathers_the_probe_history_of_its_own_settings(trained, tmp_path):
    from nclayers.jobs.sweep import _probe_history

    run = copy(trained, tmp_path)
    folder = RunFolder(run)
    one, two = (folder.config().updated({"probe.epochs": e}) for e in (1, 2))
    probe_job(one, folder, progress=False)
    probe_job(two, folder, progress=False)
    assert max(r["epoch"] for r in _probe_history(folder, one)) == 1
    assert max(r["epoch"] for r in _probe_history(folder, two)) == 2
