"""Identity pruning: what it keeps, what it refuses, and the experiment's bookkeeping."""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
from torch import nn

from nclayers.config import TrainConfig
from nclayers.data import DeviceBatches
from nclayers.data.arrays import balanced_subset
from nclayers.data.digits import load_digits_split
from nclayers.models import build_model, find_blocks
from nclayers.prune import (
    baseline_sets,
    check_prunable,
    finetune,
    prunable_layers,
    prune_experiment,
    prune_model,
    prune_summary,
    resolve_blocks,
)
from nclayers.report.prune_figures import plot_prune
from nclayers.table import Table
from tinyruns import trained_run

pytestmark = pytest.mark.usefixtures("one_thread")


def _resnet(seed=0):
    torch.manual_seed(seed)
    model = build_model("resnet18", 10, width=4).eval()
    # Non-trivial BN statistics, so a wrongly kept or dropped buffer would show.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
# CIFAR ResNet18: layer1.0 layer1.1 layer2.0 layer2.1 layer3.0 layer3.1 layer4.0 layer4.1;
# layer2.0, layer3.0 and layer4.0 downsample.
SHAPE_KEEPING = [1, 2, 4, 6, 8]


def test_prunable_blocks_are_those_that_keep_their_shape():
    model = _resnet()
    blocks = find_blocks(model)
    assert prunable_layers(model, blocks, X) == SHAPE_KEEPING
    check_prunable(model, blocks, [1, 4, 8], X)  # no error
    msg = re.escape("3 layer2.0 (4x4x32x32 -> 4x8x16x16)")
    with pytest.raises(ValueError, match=msg) as err:
        check_prunable(model, blocks, [2, 3, 5], X)
    assert "5 layer3.0" in str(err.value) and "2 layer1.1" not in str(err.value)
    assert "1 (layer1.0)" in str(err.value)  # it lists the blocks that can go


def test_identity_keeps_every_other_parameter_and_the_output_shape():
    model = _resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_model(model, ["layer1.1", "layer3.1"])
    assert isinstance(pruned.layer1[1], nn.Identity) and isinstance(pruned.layer3[1], nn.Identity)
    kept = {k: v for k, v in before.items() if not k.startswith(("layer1.1.", "layer3.1."))}
    after = pruned.state_dict()
    assert after.keys() == kept.keys()
    for k in kept:
        assert torch.equal(after[k], kept[k]), k
    # The original is untouched and still computes what it did.
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert pruned(X).shape == model(X).shape == (4, 10)


@torch.no_grad()
def test_a_removed_block_passes_its_input_on():
    model = _resnet()
    pruned = prune_model(model, ["layer1.1", "layer3.1"])
    m = model  # the forward by hand, skipping the two blocks
    h = m.relu(m.bn1(m.conv1(X)))
    h = m.layer1[0](h)
    h = m.layer2(h)
    h = m.layer3[0](h)
    h = m.layer4(h)
    expected = m.fc(torch.flatten(m.avgpool(h), 1))
    torch.testing.assert_close(pruned(X), expected, rtol=0, atol=0)
    assert not torch.equal(pruned(X), model(X))


@torch.no_grad()
def test_pruning_nothing_changes_nothing():
    model = _resnet()
    pruned = prune_model(model, [])
    assert torch.equal(pruned(X), model(X))
    assert pruned.state_dict().keys() == model.state_dict().keys()


def test_transformer_blocks_are_removed_as_identity_too():
    torch.manual_seed(0)
    vit = build_model("vit_small", 10, embed_dim=16, depth=3, num_heads=2).eval()
    blocks = find_blocks(vit)
    assert prunable_layers(vit, blocks, X[:2]) == [1, 2, 3]
    pruned = prune_model(vit, [blocks[1].name])
    with torch.no_grad():
        h = vit.patch_embed(X[:2])
        h = vit.norm_pre(vit._pos_embed(h))
        h = vit.blocks[2](vit.blocks[0](h))
        expected = vit.forward_head(vit.norm(h))
        torch.testing.assert_close(pruned(X[:2]), expected)


def test_resolve_blocks_takes_indices_and_names():
    blocks = find_blocks(_resnet())
    assert resolve_blocks("4, layer1.1,4", blocks) == [2, 4]
    assert resolve_blocks(["layer4.1", 6], blocks) == [6, 8]
    assert resolve_blocks("", blocks) == []
    with pytest.raises(
        ValueError,
        match=re.escape("9 is not a block index; this model has blocks 1..8"),
    ):
        resolve_blocks("9", blocks)
    with pytest.raises(ValueError, match=re.escape("'layer9.0' is not one of the model's blocks")):
        resolve_blocks("layer9.0", blocks)
    with pytest.raises(ValueError, match=re.escape("'nope.0' is not a module")):
        prune_model(_resnet(), ["nope.0"])


def test_baselines_remove_the_same_number_of_blocks():
    sets = baseline_sets([1, 2, 4, 6, 8], 2, seeds=[0, 1, 2])
    assert sets["last"] == [6, 8]
    for seed in (0, 1, 2):
        chosen = sets[f"random{seed}"]
        assert len(chosen) == 2 and set(chosen) <= {1, 2, 4, 6, 8} and chosen == sorted(chosen)
    assert baseline_sets([1, 2, 4, 6, 8], 2, seeds=[0])["random0"] == sets["random0"]  # seeded
    with pytest.raises(ValueError, match="only 5 shape-preserving blocks"):
        baseline_sets([1, 2, 4, 6, 8], 6, seeds=[0])


# ----------------------------------------------------------------------------- experiment
@functools.cache
def _digits(split, n):
    ds = load_digits_split(split)
    return ds.subset(balanced_subset(ds.labels["clean"], n, 10, 0))


def test_finetune_trains_in_place():
    model = _resnet()
    pruned = prune_model(model, ["layer2.1"])
    batches = DeviceBatches(_digits("train", 60), 30, shuffle=True)
    before = pruned.fc.weight.clone()
    losses = finetune(pruned, batches, 1, TrainConfig(lr=0.05), lr=0.05)
    assert len(losses) == 1 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(pruned.fc.weight, before)
    assert torch.equal(model.fc.weight, before)  # the original model is not trained


def test_prune_experiment_tables(tmp_path):
    model = _resnet()
    blocks = find_blocks(model)
    test = DeviceBatches(_digits("test", 60), 30)
    train = DeviceBatches(_digits("train", 60), 30, shuffle=True)
    summary, layers = prune_experiment(
        model, blocks, [2, 4], test, 10, label="plateau", seeds=(0, 1), train_batches=train,
        train_cfg=TrainConfig(), finetune_epochs=1, finetune_lr=0.01, run="t",
    )  # fmt: skip
    variants = [(r["variant"], r["finetune_epochs"]) for r in summary]
    names = ["none", "plateau", "last", "random0", "random1"]
    assert variants == [(v, e) for v in names for e in (0, 1)]
    by = {(r["variant"], r["finetune_epochs"]): r for r in summary}
    assert by[("plateau", 0)]["blocks"] == "layer1.1 layer2.1"
    assert by[("last", 0)]["layers"] == "6 8"
    assert {r["n_removed"] for r in summary if r["variant"] != "none"} == {2}
    # The unpruned row is the model itself: analyze's accuracy, no change.
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in test)
    assert by[("none", 0)]["test_acc"] == hits / 60
    assert by[("none", 0)]["acc_change"] == 0.0 and by[("none", 0)]["params_removed"] == 0
    removed = sum(p.numel() for p in model.layer1[1].parameters()) + sum(
        p.numel() for p in model.layer2[1].parameters()
    )
    assert by[("plateau", 1)]["params_removed"] == removed
    for r in summary:
        assert r["acc_change"] == pytest.approx(r["test_acc"] - by[("none", 0)]["test_acc"])
        same = by[("none", r["finetune_epochs"])]["test_acc"]
        assert r["acc_change_same_finetune"] == pytest.approx(r["test_acc"] - same)
    # Per-block NC of each variant; a removed block shows its predecessor's output.
    rows = {(r["variant"], r["finetune_epochs"], r["layer"]): r for r in layers}
    assert len(layers) == 10 * len(blocks)
    assert rows[("plateau", 0, 2)]["nc1"] == pytest.approx(rows[("plateau", 0, 1)]["nc1"])
    assert rows[("plateau", 0, 1)]["nc1"] == pytest.approx(rows[("none", 0, 1)]["nc1"])
    text = prune_summary(summary)
    assert "without fine-tune (unpruned" in text and "random 2 blocks (2 seeds)" in text
    ft = by[("plateau", 1)]
    assert (
        f"after a 1-epoch fine-tune (unpruned, fine-tuned alike {by[('none', 1)]['test_acc']:.4f})"
        in text
    )
    assert f"[2 4]: {ft['test_acc']:.4f} ({ft['acc_change_same_finetune']:+.4f})" in text
    assert plot_prune(summary, tmp_path / "prune.png", layers).stat().st_size > 0


def test_prune_experiment_refuses_downsampling_blocks_and_nothing_is_nothing():
    model = _resnet()
    blocks = find_blocks(model)
    test = DeviceBatches(_digits("test", 30), 30)
    with pytest.raises(ValueError, match=re.escape("3 layer2.0")):
        prune_experiment(model, blocks, [3], test, 10)
    summary, layers = prune_experiment(model, blocks, [], test, 10, label="list", seeds=(0,))
    assert [r["variant"] for r in summary] == ["none", "list"]
    a, b = summary
    assert a["test_acc"] == b["test_acc"] and a["nc1_last"] == b["nc1_last"]
    none = [r["nc1"] for r in layers if r["variant"] == "none"]
    assert none == [r["nc1"] for r in layers if r["variant"] == "list"]
    with pytest.raises(ValueError, match="needs train_batches"):
        prune_experiment(model, blocks, [1], test, 10, finetune_epochs=1)


# ----------------------------------------------------------------------------- job and CLI
TINY_RUN = [
    "data.name=digits", "data.train_subset=60", "data.test_subset=60", "model.width=4",
    "train.epochs=1", "train.batch_size=30", "train.checkpoint_every=0", "device=cpu",
    "analyze.batch_size=60", "analyze.reference=null", "train.tensorboard=false", "run=tiny",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return trained_run(tmp_path_factory, "prune", TINY_RUN, analyze=True)


def test_prune_verb_on_a_run_folder(tiny_run, tmp_path, capsys):
    from nclayers.cli import main
    from nclayers.jobs import RunFolder

    out = tmp_path / "pruned"
    rc = main(["prune", str(tiny_run), "--blocks", "1,layer4.1", "--finetune-epochs", "1",
               "prune.seeds=[0]", "--out", str(out), "-q"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "after a 1-epoch fine-tune" in text
    table = RunFolder(out).read_table("prune.csv")
    assert [(r["variant"], r["finetune_epochs"]) for r in table] == [
        (v, e) for v in ("none", "list", "last", "random0") for e in (0, 1)
    ]
    assert table[2]["blocks"] == "layer1.0 layer4.1" and table[4]["layers"] == "6 8"
    assert prune_summary(table) in text
    assert (out / "prune.png").is_file()
    # prune_layers.csv is a layers table: one curve per variant and fine-tune for equality.
    from nclayers.equality import analyze_equality

    curves = analyze_equality(Table.from_csv(out / "prune_layers.csv"))
    assert sorted((c.key["variant"], c.key["finetune_epochs"]) for c in curves) == sorted(
        (r["variant"], r["finetune_epochs"]) for r in table
    )
    assert RunFolder(out).done(
        "prune",
        RunFolder(out).config(
            ["prune.blocks=1,layer4.1", "prune.finetune_epochs=1", "prune.seeds=[0]"]
        ),
    )
    # A downsampling block is refused, by name.
    assert main(["prune", str(tiny_run), "--blocks", "3", "--out", str(out), "-q"]) == 2
    assert "3 layer2.0" in capsys.readouterr().err
    assert main(["prune", str(tiny_run), "--blocks", "layer9.9", "--out", str(out), "-q"]) == 2
    assert "'layer9.9' is not one of the model's blocks" in capsys.readouterr().err


def test_prune_plateau_takes_the_equality_rule_blocks(tiny_run, tmp_path):
    from nclayers.equality import analyze_equality
    from nclayers.jobs import RunFolder
    from nclayers.jobs.prune import prune_job

    folder = RunFolder(tiny_run)
    cfg = folder.config(["equality.plateau_fraction=1.0", "equality.plateau_min_run=1",
                         "prune.seeds=[0]", "prune.baselines=[last]"])  # fmt: skip
    result = prune_job(cfg, folder, progress=False)
    rule = analyze_equality(folder.layers(), fraction=1.0, min_run=1)[0].plateau
    model = _resnet()
    keep = set(prunable_layers(model, find_blocks(model), X))
    expected = [layer for layer in rule.layers if layer in keep]
    assert rule.layers  # below-mean blocks always exist at fraction 1 and runs of 1
    row = next(r for r in result.summary if r["variant"] == "plateau")
    assert row["layers"] == " ".join(map(str, expected))
    assert any(n.startswith("plateau rule: block l is redundant") for n in result.notes)
    skipped = [layer for layer in rule.layers if layer not in keep]
    assert any("change shape" in n for n in result.notes) == bool(skipped)
    assert {r["variant"] for r in result.summary} == {"none", "plateau", "last"}


def test_equality_and_prune_plateau_agree(tiny_run, tmp_path, capsys):
    """14.8: `equality RUN` and `prune RUN --blocks plateau` use the same equality settings
    (the run's, e.g. a sweep's equality.*), so they name the same blocks."""
    import json
    import shutil

    from nclayers.cli import main
    from nclayers.jobs import RunFolder

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    folder = RunFolder(run)
    folder.save_config(folder.config(["equality.plateau_fraction=1.0",
                                      "equality.plateau_min_run=1"]))  # fmt: skip
    assert main(["equality", str(run), "--no-plot"]) == 0
    redundant = json.loads((run / "equality.json").read_text())[0]["redundant_blocks"]
    assert redundant  # at fraction 1 some block is below the mean
    assert main(["prune", str(run), "--blocks", "plateau", "prune.seeds=[0]",
                 "prune.baselines=[last]", "-q"]) == 0  # fmt: skip
    notes = capsys.readouterr().out
    assert "plateau blocks from equality.json" in notes
    model = _resnet()
    keep = set(prunable_layers(model, find_blocks(model), X))
    row = next(r for r in folder.read_table("prune.csv") if r["variant"] == "plateau")
    assert row["layers"] == " ".join(str(b) for b in redundant if b in keep)


# ----------------------------------------------------------------------------- the baseline
ADAMW_RUN = [
    "data.name=digits", "data.train_subset=300", "model.name=resnet18", "model.width=8",
    "train.epochs=8", "train.batch_size=32", "train.optimizer=adamw", "train.lr=0.002",
    "train.weight_decay=0.0005", "train.schedule=cosine", "train.min_lr=0.00002",
    "train.augment=false", "train.tensorboard=false", "device=cpu", "run=adamw",
]  # fmt: skip


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
    return trained_run(tmp_path_factory, "adamw", ADAMW_RUN)


def test_the_default_finetune_keeps_an_adamw_baseline_and_a_wrecking_one_is_flagged(
    adamw_run, tmp_path, capsys
):
    """The run's own AdamW at the lr its cosine schedule ended with keeps the unpruned
    model within 2 points; 0.05 (AdamW's steps are lr-sized whatever the gradient) wrecks
    it, and prune.csv, the CLI print and the summary say so."""
    from nclayers.cli import main
    from nclayers.config import load_config
    from nclayers.jobs import RunFolder
    from nclayers.prune import BASELINE_DROP, final_lr

    args = ["prune", str(adamw_run), "--blocks", "2", "--finetune-epochs", "1", "prune.seeds=[0]",
            "-q"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "kept")]) == 0, capsys.readouterr().err
    kept = capsys.readouterr().out
    table = RunFolder(tmp_path / "kept").read_table("prune.csv")
    none = {r["finetune_epochs"]: r for r in table.where(variant="none")}
    assert none[0]["test_acc"] >= 0.6  # a trained model worth keeping
    assert none[0]["test_acc"] - none[1]["test_acc"] <= BASELINE_DROP
    tc = load_config(None, ADAMW_RUN).train
    assert none[1]["finetune_lr"] == pytest.approx(final_lr(tc))
    assert final_lr(tc) == pytest.approx(
        2e-5 + (0.002 - 2e-5) * 0.5 * (1 + math.cos(math.pi * 7 / 8))  # epoch 8 of 8
    )
    assert [r["baseline_flag"] for r in table] == [None, False] * (len(table) // 2)
    assert "baseline wrecked" not in kept

    assert main([*args, "prune.finetune_lr=0.05", "--out", str(tmp_path / "wrecked")]) == 0
    wrecked = capsys.readouterr().out
    table = RunFolder(tmp_path / "wrecked").read_table("prune.csv")
    none = {r["finetune_epochs"]: r for r in table.where(variant="none")}
    assert none[0]["test_acc"] - none[1]["test_acc"] > BASELINE_DROP
    assert none[1]["baseline_drop"] == pytest.approx(none[0]["test_acc"] - none[1]["test_acc"])
    assert [r["baseline_flag"] for r in table] == [None, True] * (len(table) // 2)
    assert "baseline wrecked" in wrecked and "baseline wrecked" in prune_summary(table)
