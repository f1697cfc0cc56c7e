"""Hugging Face models: build_model("hf:...") from local folders, block discovery, each
block's feature = the layer's own output (before any final norm)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import tiny_model
from nclayers.models import build_model, find_blocks
from nclayers.models.hf import example_inputs, is_hf_model
from nclayers.taps import probe_shapes

pytestmark = pytest.mark.usefixtures("one_thread")

# family, task, the class of its layers, the pooling and prefix tokens find_blocks gives
FAMILIES = [
    ("bert", "sequence", "BertLayer", "mean", 0),
    ("roberta", "sequence", "RobertaLayer", "mean", 0),
    ("deberta-v2", "sequence", "DebertaV2Layer", "mean", 0),
    ("vit", "image", "ViTLayer", "tokens", 1),
    ("deit", "image", "DeiTLayer", "tokens", 2),
    ("gpt2", "causal_lm", "GPT2Block", "mean", 0),
    ("llama", "causal_lm", "LlamaDecoderLayer", "mean", 0),
    ("qwen2", "causal_lm", "Qwen2DecoderLayer", "mean", 0),
]


@pytest.mark.parametrize(("family", "task", "layer_class", "pool", "prefix"), FAMILIES)
def test_blocks_are_the_layers(family, task, layer_class, pool, prefix):
    model = tiny_model(family, task, layers=3)
    blocks = find_blocks(model, "auto")
    # Independently: the modules of the layer class, in the order the model holds them.
    layers = [m for m in model.modules() if type(m).__name__ == layer_class]
    assert len(layers) == 3
    assert [b.module for b in blocks] == layers
    assert {(b.pool, b.prefix_tokens) for b in blocks} == {(pool, prefix)}
    shapes = probe_shapes(model, blocks, example_inputs(model, batch=2, length=5))
    tokens = 5 if task != "image" else 16 + prefix  # 16 patches of 4x4 in 16x16
    assert shapes == [((2, tokens, 32), 32)] * 3


@torch.no_grad()
@pytest.mark.parametrize(("family", "task"), [("bert", "sequence"), ("gpt2", "causal_lm"),
                                              ("llama", "causal_lm")])  # fmt: skip
def test_block_output_is_the_layer_output_before_the_final_norm(family, task):
    """output_hidden_states[l] is layer l's own output for every layer of BERT; GPT-2 and
    LLaMA apply their final norm to the last entry, the block's feature is before it."""
    model = tiny_model(family, task, layers=3)
    inputs = example_inputs(model, batch=2, length=6)
    seen = []
    with_hooks = [b.module.register_forward_hook(lambda m, a, o: seen.append(o)) for b in
                  find_blocks(model)]  # fmt: skip
    try:
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    finally:
        for h in with_hooks:
            h.remove()
    outs = [o[0] if isinstance(o, tuple) else o for o in seen]
    assert len(hidden) == 4 and len(outs) == 3
    for layer in range(2):
        torch.testing.assert_close(outs[layer], hidden[layer + 1])
    normed = family != "bert"
    assert torch.allclose(outs[2], hidden[3]) != normed


def test_build_model_from_saved_folders(tmp_path):
    bert = tiny_model("bert", "sequence", num_labels=3)
    bert.save_pretrained(tmp_path / "bert")
    model = build_model(f"hf:{tmp_path / 'bert'}", 3)
    assert is_hf_model(model) and not model.training
    x = example_inputs(model)
    torch.testing.assert_close(model(**x).logits, bert(**x).logits)
    # Another number of classes: a new head, the layers as saved.
    five = build_model(f"hf:{tmp_path / 'bert'}", 5)
    assert five(**x).logits.shape == (2, 5)
    dense = [m.bert.encoder.layer[1].output.dense.weight for m in (five, bert)]
    torch.testing.assert_close(*dense)
    # A causal LM keeps its vocabulary; the cache is off.
    lm = tiny_model("llama", "causal_lm")
    lm.save_pretrained(tmp_path / "lm")
    loaded = build_model(f"hf:{tmp_path / 'lm'}", 10)
    assert loaded.config.use_cache is False
    assert loaded(**example_inputs(loaded)).logits.shape == (2, 8, 120)
    # A folder with a config only: fresh weights when asked.
    lm.config.save_pretrained(tmp_path / "config-only")
    with pytest.raises(ValueError, match="init=config"):
        build_model(f"hf:{tmp_path / 'config-only'}", 10)
    fresh = build_model(f"hf:{tmp_path / 'config-only'}", 10, init="config")
    assert len(find_blocks(fresh)) == 3
    with pytest.raises(ValueError, match="no model config found"):
        build_model(f"hf:{tmp_path / 'nothing'}", 2)
    with pytest.raises(ValueError, match="task='translation'"):
        build_model(f"hf:{tmp_path / 'bert'}", 2, task="translation")


def test_importing_nclayers_does_not_import_transformers():
    code = (
        "import sys, nclayers, nclayers.models, nclayers.analysis, nclayers.data;"
        "import nclayers.models.hf, nclayers.data.text;"
        "print(sorted(m for m in ('transformers', 'datasets', 'tokenizers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
