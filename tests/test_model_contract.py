"""The model contract of the README: what an entry point may be, what a forward may
return, and a checkpoint loaded without its classifier. Every case works, or fails in one
line that names the fix (exit status 2)."""

from __future__ import annotations

import pytest
import torch

from nclayers.cli import main
from nclayers.errors import NCLayersError
from nclayers.models import build_model, load_weights
from nclayers.table import Table
from nclayers.taps import output_logits

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = ["data.name=digits", "data.train_subset=100", "data.test_subset=60", "device=cpu"]
TRAIN = [*DATA, "train.epochs=1", "train.tensorboard=false", "-q"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("nclayers ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_an_entry_point_without_num_classes_trains_and_is_measured(tmp_path):
    out = tmp_path / "run"
    assert (
        main(["train", "model.name=custom_models:no_num_classes", *TRAIN, "--out", str(out)]) == 0
    )
    assert main(["analyze", str(out), "-q"]) == 0
    assert [r["block"] for r in Table.from_csv(out / "layers.csv").where(split="test")] == [
        "blocks.0",
        "blocks.1",
    ]


def test_a_head_for_other_classes_is_refused_before_training(tmp_path, capsys):
    rc = main(["train", "model.name=custom_models:five_outputs", *TRAIN, "--out", str(tmp_path)])
    assert rc == 2
    err = one_line_error(capsys)
    assert "5 outputs" in err and "10 classes" in err and "num_classes" in err


def test_a_forward_returning_a_mapping_of_logits_trains_and_is_measured(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "model.name=custom_models:dict_logits", *TRAIN, "--out", str(out)]) == 0
    assert main(["analyze", str(out), "-q"]) == 0
    rows = Table.from_csv(out / "layers.csv")
    assert len(rows.where(split="test")) == 2


def test_output_logits_reads_every_documented_return():
    t = torch.randn(3, 4)
    assert output_logits(t) is t
    assert output_logits((t, None)) is t
    assert output_logits({"logits": t, "features": None}) is t
    with pytest.raises(NCLayersError, match="no 'logits'"):
        output_logits({"features": t})
    with pytest.raises(NCLayersError, match="not logits"):
        output_logits(None)


def test_a_model_without_trainable_parameters_is_refused(tmp_path, capsys):
    assert main(["train", "model.name=custom_models:frozen", *TRAIN, "--out", str(tmp_path)]) == 2
    err = one_line_error(capsys)
    assert "no trainable parameter" in err and "model.untrained=true" in err


def test_num_classes_in_model_options_is_refused(tmp_path, capsys):
    rc = main(["analyze", *DATA, "model.untrained=true", "model.options={num_classes: 1000}",
               "--out", str(tmp_path), "-q"])  # fmt: skip
    assert rc == 2
    err = one_line_error(capsys)
    assert "model.options.num_classes=1000" in err and "model.skip_head=true" in err


@pytest.fixture(scope="module")
def c100(tmp_path_factory):
    """A CIFAR ResNet checkpoint with a 100-class head."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "c100.pt"
    torch.save({"model": build_model("resnet18", 100, width=4).state_dict()}, path)
    return path


def test_a_head_size_mismatch_advises_skip_head(tmp_path, capsys, c100):
    rc = main(["analyze", *DATA, "model.width=4", f"model.checkpoint={c100}",
               "--out", str(tmp_path), "-q"])  # fmt: skip
    assert rc == 2
    err = one_line_error(capsys)
    assert "fc.weight" in err and "model.skip_head=true" in err and "skip=['fc" not in err


@pytest.mark.parametrize("skip", ["model.skip_head=true", "model.skip=fc.*"])
def test_a_checkpoint_loads_without_its_classifier(tmp_path, c100, skip):
    out = tmp_path / "run"
    rc = main(["analyze", *DATA, "model.width=4", f"model.checkpoint={c100}", skip,
               "--out", str(out), "-q"])  # fmt: skip
    assert rc == 0
    assert len(Table.from_csv(out / "layers.csv").where(split="test")) == 8
    # The backbone is the checkpoint's, the head the model's own (10 classes).
    state = torch.load(c100, weights_only=True)["model"]
    model = build_model("resnet18", 10, width=4)
    fc = model.fc.weight.clone()
    load_weights(model, c100, skip_head=True)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.fc.weight, fc)


def test_skip_without_a_checkpoint_is_refused(tmp_path, capsys):
    rc = main(["analyze", *DATA, "model.untrained=true", "model.skip_head=true",
               "--out", str(tmp_path), "-q"])  # fmt: skip
    assert rc == 2
    err = one_line_error(capsys)
    assert "model.skip_head=true applies to" in err and "model.checkpoint=FILE" in err


def test_head_keys_name_the_classifier():
    import torchvision

    from nclayers.models.weights import head_keys

    assert head_keys(build_model("resnet18", 10, width=4)) == ["fc.*"]
    with torch.device("meta"):  # the modules only: no weights to initialise
        vgg = torchvision.models.vgg11()
    assert head_keys(vgg) == ["classifier.6.*"]
    assert head_keys(build_model("vit_small", 10)) == ["head.*"]
