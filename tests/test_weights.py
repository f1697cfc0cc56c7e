"""Loading checkpoints: nclayers' own, plain, timm/torchvision and mmpretrain ones."""

from __future__ import annotations

import argparse
import re

import pytest
import timm
import torch
import torchvision.models as tvm
from torch import nn
from torch.nn import functional as F
from torchvision.models.vgg import cfgs, make_layers

from nclayers.models import build_model, load_weights

_RESET = {"weight_init": "reset"}  # timm: PyTorch's default init, faster than timm's own


def fresh(name: str, seed: int, **options) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, **options).eval()


def same_outputs(a: nn.Module, b: nn.Module, side: int = 32) -> None:
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- round trips
def test_nclayers_checkpoint_round_trip(tmp_path):
    src, dst = fresh("resnet18", 0, width=8), fresh("resnet18", 1, width=8)
    path = tmp_path / "last.pt"
    torch.save({"model": src.state_dict(), "epoch": 3, "config": {"model": "resnet18"}}, path)
    same_outputs(load_weights(dst, path), src)


def test_plain_and_ddp_state_dict_round_trip(tmp_path):
    src = fresh("vgg13", 0)
    torch.save(src.state_dict(), tmp_path / "plain.pt")
    same_outputs(load_weights(fresh("vgg13", 1), tmp_path / "plain.pt"), src)
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, tmp_path / "ddp.pt")
    same_outputs(load_weights(fresh("vgg13", 2), tmp_path / "ddp.pt"), src)


def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    src = fresh("vit_small", 0, embed_dim=48, depth=2, **_RESET)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    dst = fresh("vit_small", 1, embed_dim=48, depth=2, **_RESET)
    same_outputs(load_weights(dst, tmp_path / "w.safetensors"), src)


# ----------------------------------------------------------------------------- mismatches
def test_other_architecture_is_refused_naming_the_keys(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"model": fresh("resnet18", 0, width=8).state_dict()}, path)
    with pytest.raises(ValueError) as info:
        load_weights(fresh("vgg13", 0), path)
    msg = str(info.value)
    assert "does not match CifarVGG" in msg and "resnet.pt" in msg
    assert "model keys missing from it" in msg and "features.0.weight" in msg
    assert "keys the model lacks" in msg and "conv1.weight" in msg
    assert "another architecture" in msg
    # Nothing in common is refused even when not strict.
    with pytest.raises(ValueError, match="does not match"):
        load_weights(fresh("vgg13", 0), path, strict=False)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    path = tmp_path / "w8.pt"
    torch.save(fresh("resnet18", 0, width=8).state_dict(), path)
    with pytest.raises(ValueError) as info:
        load_weights(fresh("resnet18", 0, width=16), path, strict=False)
    msg = str(info.value)
    assert "shape mismatches" in msg
    assert "conv1.weight: checkpoint (8, 3, 3, 3) vs model (16, 3, 3, 3)" in msg


def test_other_classes_load_with_the_head_skipped(tmp_path):
    src = fresh("resnet18", 0, width=8, num_classes=100)
    torch.save(src.state_dict(), tmp_path / "c100.pt")
    with pytest.raises(ValueError, match=r"fc\.weight: checkpoint \(100, 64\) vs model \(10, 64\)"):
        load_weights(fresh("resnet18", 1, width=8), tmp_path / "c100.pt")
    dst = load_weights(fresh("resnet18", 1, width=8), tmp_path / "c100.pt", skip=["fc.*"])
    torch.testing.assert_close(dst.conv1.weight, src.conv1.weight)
    assert dst.fc.out_features == 10


def test_unreadable_or_missing_files_are_explained(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_weights(fresh("vgg13", 0), tmp_path / "nope.pt")
    torch.save({"model": {}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match=r"weights_only=True.*re-save only its state_dict"):
        load_weights(fresh("vgg13", 0), tmp_path / "pickled.pt")
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="holds no state_dict"):
        load_weights(fresh("vgg13", 0), tmp_path / "empty.pt")


# ----------------------------------------------------------------------------- timm / torchvision
def test_torchvision_resnet_state_dict_loads_into_timm_resnet(tmp_path):
    # Same architecture, same module names: a torchvision file works as it is.
    torch.manual_seed(0)
    src = tvm.resnet18(weights=None, num_classes=10).eval()
    torch.save(src.state_dict(), tmp_path / "tv.pth")
    dst = timm.create_model("resnet18", pretrained=False, num_classes=10)
    same_outputs(load_weights(dst, tmp_path / "tv.pth"), src, side=64)


def test_timm_swin_state_dict_loads_into_the_registry_swin(tmp_path):
    torch.manual_seed(0)
    narrow = {"embed_dim": 24, **_RESET}  # timm's Swin-T layout at a quarter of its width
    src = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, **narrow).eval()
    torch.save(src.state_dict(), tmp_path / "swin.pth")
    dst = fresh("swin_tiny", 1, img_size=224, **narrow)
    same_outputs(load_weights(dst, tmp_path / "swin.pth"), src, side=224)


def test_torchvision_vgg_features_load_into_the_cifar_vgg(tmp_path):
    # torchvision's vgg13_bn, on the meta device: its 100M-weight classifier costs nothing.
    with torch.device("meta"):
        tv = tvm.vgg13_bn(weights=None, init_weights=False).state_dict()
    features = {k: v.shape for k, v in tv.items() if k.startswith("features.")}
    ours = fresh("vgg13", 1).state_dict()
    assert {k: ours[k].shape for k in features} == features
    # A checkpoint with torchvision's features (and a classifier the CIFAR VGG lacks).
    torch.manual_seed(0)
    trunk = make_layers(cfgs["B"], batch_norm=True).eval()
    state = {f"features.{k}": v for k, v in trunk.state_dict().items()}
    state["classifier.6.weight"] = torch.zeros(1000, 4096)
    torch.save(state, tmp_path / "vgg13_bn.pth")
    dst = load_weights(fresh("vgg13", 1), tmp_path / "vgg13_bn.pth", strict=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst.features(x), trunk(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- mmpretrain
def mm_checkpoint(state: dict, rename) -> dict:
    """An mmpretrain checkpoint as `tools/train.py` + `publish_model` leave it."""
    meta = {"mmpretrain_version": "1.2.0", "dataset_meta": {"classes": ["a", "b"]}}
    return {"meta": meta, "state_dict": dict(rename(k, v) for k, v in state.items())}


def mm_resnet_key(key: str, value, norm_name: str = "bn"):
    # torchvision -> mmpretrain, as mmpretrain's torchvision_to_mmcls converter does it.
    if key.startswith("fc."):
        return "head." + key, value
    return "backbone." + re.sub(r"(^|\.)bn(\d)\.", rf"\1{norm_name}\2.", key), value


@pytest.mark.parametrize("norm_name", ["bn", "norm"])
def test_mmpretrain_resnet_checkpoint(tmp_path, norm_name):
    src = fresh("resnet50", 0, width=8)
    ckpt = mm_checkpoint(src.state_dict(), lambda k, v: mm_resnet_key(k, v, norm_name))
    assert "backbone.layer1.0.downsample.1.running_var" in ckpt["state_dict"]
    torch.save(ckpt, tmp_path / "mm.pth")
    same_outputs(load_weights(fresh("resnet50", 1, width=8), tmp_path / "mm.pth"), src)


def to_unfold_order(t: torch.Tensor) -> torch.Tensor:
    """Patch-merging channels from the original Swin's order to mmcv's nn.Unfold order
    (mmseg's `correct_unfold_reduction_order`/`correct_unfold_norm_order`)."""
    lead, c4 = t.shape[:-1], t.shape[-1]
    t = t.reshape(*lead, 4, c4 // 4)[..., [0, 2, 1, 3], :]
    return t.transpose(-1, -2).reshape(*lead, c4)


def mm_relative_position_index(window: int) -> torch.Tensor:
    """mmpretrain WindowMSA's index (its 'double_step_seq' construction)."""
    seq1 = torch.arange(0, (2 * window - 1) * window, 2 * window - 1)
    seq2 = torch.arange(0, window)
    coords = (seq1[:, None] + seq2[None, :]).reshape(1, -1)
    return (coords + coords.T).flip(1).contiguous()


def mm_swin_key(key: str, value):
    """timm Swin -> mmpretrain Swin (the inverse of what load_weights undoes)."""
    rules = [
        (r"^patch_embed\.proj\.", "backbone.patch_embed.projection."),
        (r"^patch_embed\.norm\.", "backbone.patch_embed.norm."),
        (r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.", r"backbone.stages.\1.blocks.\2.attn.w_msa."),
        (
            r"^layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.",
            r"backbone.stages.\1.blocks.\2.ffn.layers.0.0.",
        ),
        (
            r"^layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.",
            r"backbone.stages.\1.blocks.\2.ffn.layers.1.",
        ),
        (r"^layers\.(\d+)\.blocks\.(\d+)\.(norm\d)\.", r"backbone.stages.\1.blocks.\2.\3."),
        (r"^norm\.", "backbone.norm3."),
    ]
    if m := re.match(r"^layers\.(\d+)\.downsample\.(\w+)\.(\w+)$", key):
        return f"backbone.stages.{int(m[1]) - 1}.downsample.{m[2]}.{m[3]}", to_unfold_order(value)
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key), value
    return key, value  # head.fc.* is already mmpretrain's LinearClsHead name


def test_unfold_order_is_mmcv_patch_merging():
    # The test's own conversion is right: mmcv's Unfold-based merging with converted weights
    # computes what timm's merging computes.
    model = fresh("swin_tiny", 0, embed_dim=24, patch_size=4, window_size=4, **_RESET)
    merge = model.layers[1].downsample
    with torch.no_grad():
        merge.norm.weight.normal_()
        merge.norm.bias.normal_()
        x = torch.randn(2, 8, 8, 24)
        want = merge(x)
        cols = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)
        norm = merge.norm
        cols = F.layer_norm(
            cols, (96,), to_unfold_order(norm.weight), to_unfold_order(norm.bias), norm.eps
        )
        got = (cols @ to_unfold_order(merge.reduction.weight).T).view(2, 4, 4, 48)
    torch.testing.assert_close(got, want)


def test_mmpretrain_relative_position_index_is_timms():
    # Why the bias tables copy over unchanged.
    model = fresh("swin_tiny", 0, embed_dim=24, window_size=4, **_RESET)
    index = model.layers[0].blocks[0].attn.relative_position_index
    assert torch.equal(index.view(16, 16), mm_relative_position_index(4))


def swin_mm_state(model: nn.Module) -> dict:
    ckpt = mm_checkpoint(model.state_dict(), mm_swin_key)
    state = ckpt["state_dict"]
    for i, layer in enumerate(model.layers):  # buffers mmpretrain saves and timm rebuilds
        for j, block in enumerate(layer.blocks):
            window = block.attn.window_size[0]
            state[f"backbone.stages.{i}.blocks.{j}.attn.w_msa.relative_position_index"] = (
                mm_relative_position_index(window)
            )
    return ckpt


def test_mmpretrain_swin_checkpoint(tmp_path):
    # Window 2 on a 16x16 grid: every stage's grid is at least a window, as mmpretrain needs.
    opts = {"embed_dim": 24, "window_size": 2, **_RESET}
    src = fresh("swin_tiny", 0, **opts)
    with torch.no_grad():  # non-trivial merge norms, so a channel-order slip would show
        for layer in src.layers[1:]:
            layer.downsample.norm.weight.normal_()
    ckpt = swin_mm_state(src)
    assert "backbone.stages.0.downsample.reduction.weight" in ckpt["state_dict"]
    torch.save(ckpt, tmp_path / "swin_mm.pth")
    same_outputs(load_weights(fresh("swin_tiny", 1, **opts), tmp_path / "swin_mm.pth"), src)


def test_mmpretrain_swin_with_an_unknown_part_names_it(tmp_path):
    opts = {"embed_dim": 24, "window_size": 2, **_RESET}
    ckpt = swin_mm_state(fresh("swin_tiny", 0, **opts))
    ckpt["state_dict"]["backbone.absolute_pos_embed"] = torch.zeros(1, 256, 24)
    torch.save(ckpt, tmp_path / "abs.pth")
    with pytest.raises(ValueError) as info:
        load_weights(fresh("swin_tiny", 1, **opts), tmp_path / "abs.pth")
    msg = str(info.value)
    assert "mmpretrain" in msg and "absolute_pos_embed" in msg
    # A ResNet checkpoint into a Swin: refused, with both sides' keys shown.
    ckpt = mm_checkpoint(fresh("resnet18", 0, width=8).state_dict(), mm_resnet_key)
    torch.save(ckpt, tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"(?s)patch_embed\.proj\.weight.*'conv1\.weight'"):
        load_weights(fresh("swin_tiny", 1, **opts), tmp_path / "r18.pth")
