"""Image data sets through `datasets` for vision transformers: decoded, cropped, served by
DeviceBatches, measured by analyze."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("transformers")

from hf_tiny import tiny_model
from nclayers import metrics
from nclayers.analysis import analyze
from nclayers.data import DeviceBatches
from nclayers.data.hf_images import load_image_split
from nclayers.models import find_blocks

pytestmark = pytest.mark.usefixtures("one_thread")


def test_images_from_a_saved_dataset_feed_a_vit(tmp_path):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 16, 20, 3), dtype=np.uint8)  # 16 high, 20 wide
    names = datasets.ClassLabel(names=["a", "b", "c"])
    features = datasets.Features({"img": datasets.Image(), "label": names})
    rows = {"img": [Image.fromarray(p) for p in pixels], "label": [i % 3 for i in range(12)]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features)}).save_to_disk(
        str(tmp_path / "imgs")
    )
    ds = load_image_split(str(tmp_path / "imgs"), "test", size=16, resize=16, image_column="img",
                          mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # fmt: skip
    # The short side is already 16: no resize, the centre 16 of the 20 columns.
    assert ds.images.shape == (12, 3, 16, 16) and ds.classes == ["a", "b", "c"]
    assert torch.equal(ds.images, torch.from_numpy(pixels[:, :, 2:18]).permute(0, 3, 1, 2))
    assert ds.labels["clean"].tolist() == rows["label"]
    vit = tiny_model("vit", "image", layers=2)
    table = analyze(vit, DeviceBatches(ds, 5), 3, progress=False)
    assert [r["n"] for r in table] == [12, 12] and table.samples == 12
    # By hand: every layer's mean over its patch tokens (after the class token, the
    # default pool) on the normalised pixels.
    blocks = find_blocks(vit)
    assert {(b.pool, b.prefix_tokens) for b in blocks} == {("tokens", 1)}
    outs = []
    hooks = [b.module.register_forward_hook(lambda m, a, o: outs.append(o[0] if
             isinstance(o, tuple) else o)) for b in blocks]  # fmt: skip
    with torch.no_grad():
        vit((ds.images.float() / 255 - 0.5) / 0.5)
    for h in hooks:
        h.remove()
    y = ds.labels["clean"]
    for row, out in zip(table, outs, strict=True):
        assert row["nc1"] == pytest.approx(metrics.nc1(out[:, 1:].double().mean(1), y, 3), rel=1e-4)
    with pytest.raises(ValueError, match=r"data\.image_column='image'"):
        load_image_split(str(tmp_path / "imgs"), "test", size=16)
