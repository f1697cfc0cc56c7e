"""Hugging Face `transformers` models: loading, their layers as blocks, example inputs.

`build_model("hf:PATH_OR_ID", num_classes, **options)` (model.name=hf:PATH_OR_ID) loads
a model through the Auto classes from a local folder (`save_pretrained`), or from the hub
by id where the machine is online, exactly as `from_pretrained` does:

- task "sequence" (AutoModelForSequenceClassification), "image"
  (AutoModelForImageClassification) or "causal_lm" (AutoModelForCausalLM); by default
  the task the config's `architectures` name (`...ForSequenceClassification`,
  `...ForImageClassification`, `...ForCausalLM` / `...LMHeadModel`), else "image" for a
  vision config and "sequence" for a text one;
- `num_classes` sets the classifier head of the classification tasks (a head of another
  size in the checkpoint is replaced by a new one, as `ignore_mismatched_sizes` does);
  a causal LM keeps its vocabulary;
- `init="config"` builds the model from the folder's config.json with fresh weights
  (for training a small model from scratch), `init="pretrained"` (default) loads them;
- every other option goes to `from_pretrained` (e.g. dtype="bfloat16", revision=...).

The model's key-value cache is switched off (`config.use_cache = False`): one pass over
whole sequences never reuses it.

Blocks (`find_blocks(model, "auto")`) are the encoder/decoder layers: the `nn.ModuleList`s
named `layer`, `layers`, `h`, `block` or `blocks` whose modules' classes end in "Layer"
or "Block" (BERT/RoBERTa/DeBERTa: `*.encoder.layer`; ViT/DeiT: `vit.layers` in
transformers 5, `vit.encoder.layer` before; GPT-2: `transformer.h`; LLaMA/Mistral/Qwen2:
`model.layers`; T5: `encoder.block` then `decoder.block`), the innermost where such
lists nest (Swin's stages hold its layers). A block's feature is the layer module's
own output hidden state, before any final norm. Sequence blocks pool "mean" (the real
tokens, by the batch's attention mask); vision blocks pool "tokens" after their class,
distillation and register tokens.

`transformers` is imported only when a model is built, never by `import nclayers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from nclayers.errors import NCLayersError

PREFIX = "hf:"
TASKS = ("sequence", "image", "causal_lm")
INITS = ("pretrained", "config")
# Attribute names of the ModuleLists that hold a transformer's layers.
LAYER_LISTS = ("layer", "layers", "h", "block", "blocks")
# How the class names of transformer layers end (BertLayer, GPT2Block, LlamaDecoderLayer).
LAYER_CLASS_ENDINGS = ("Layer", "Block")
# Embedding parameters that prepend tokens to a vision transformer's patch tokens.
# Families whose layers pass their hidden states as T x N x D (sequence first).
SEQUENCE_FIRST = ("xlnet",)
PREFIX_TOKEN_PARAMS = ("cls_token", "distillation_token", "register_tokens")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")  # fmt: skip


def is_hf_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def is_causal_lm(model: nn.Module) -> bool:
    """A transformers causal language model (its class: ...ForCausalLM, ...LMHeadModel)."""
    return is_hf_model(model) and type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def config_only(name: str) -> bool:
    """`hf:FOLDER` names a local folder with a config.json and no weights (a model to
    train from scratch)."""
    return is_hf_name(name) and _config_only(name.removeprefix(PREFIX))


def is_hf_model(model: nn.Module) -> bool:
    """A `transformers` model (tested by class name, so transformers is not imported)."""
    return any(cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise NCLayersError(
            "model.name=hf:...: the Hugging Face extra is not installed; "
            'pip install -e ".[hf]" (transformers, datasets, tokenizers)'
        ) from None
    return transformers


def task_of(config) -> str:
    """The task a config's `architectures` name; else image or sequence by its inputs."""
    for arch in getattr(config, "architectures", None) or ():
        if arch.endswith("ForSequenceClassification"):
            return "sequence"
        if arch.endswith("ForImageClassification"):
            return "image"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal_lm"
    if hasattr(config, "image_size") and hasattr(config, "num_channels"):
        return "image"
    return "sequence"


def _auto_class(transformers, task: str):
    if task not in TASKS:
        raise NCLayersError(f"task={task!r}: choose one of {list(TASKS)}")
    return {
        "sequence": transformers.AutoModelForSequenceClassification,
        "image": transformers.AutoModelForImageClassification,
        "causal_lm": transformers.AutoModelForCausalLM,
    }[task]


def build_hf_model(
    name: str,
    num_classes: int | None = None,
    task: str | None = None,
    init: str = "pretrained",
    **options,
) -> nn.Module:
    """Load `hf:PATH_OR_ID` (or a bare path/id) through the Auto class of its task; see
    the module doc. Returns the `transformers` model in eval mode."""
    transformers = _transformers()
    source = name.removeprefix(PREFIX)
    if init not in INITS:
        raise NCLayersError(f"init={init!r}: choose one of {list(INITS)}")
    if not source:
        raise NCLayersError("model.name='hf:': name a folder or a hub id after 'hf:'")
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except OSError as err:
        raise NCLayersError(
            f"model.name={name!r}: no model config found ({err}); give a folder written by "
            "save_pretrained (with config.json) or a hub id on a machine that is online"
        ) from None
    task = task or task_of(config)
    auto = _auto_class(transformers, task)
    mismatched = False
    if task != "causal_lm" and num_classes is not None:
        k = int(num_classes)
        if getattr(config, "num_labels", None) != k:
            # A head for k classes; the checkpoint's head (and label names) count others.
            config.id2label = {i: f"LABEL_{i}" for i in range(k)}
            config.label2id = {v: i for i, v in config.id2label.items()}
            config.num_labels = k
            mismatched = True
    if init == "config" or _config_only(source):
        if init != "config":
            raise NCLayersError(
                f"model.name={name!r}: the folder holds a config but no weights; pass "
                "model.options.init=config to build the model with fresh weights"
            )
        model = auto.from_config(config, **options)
    else:
        if mismatched:
            options = {"ignore_mismatched_sizes": True, **options}
        try:
            model = auto.from_pretrained(source, config=config, **options)
        except (OSError, TypeError, ValueError) as err:
            raise NCLayersError(f"model.name={name!r}: cannot be loaded ({err})") from None
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.eval()


def _config_only(source: str) -> bool:
    """A local folder with config.json but no weight file."""
    folder = Path(source)
    return (
        folder.is_dir()
        and (folder / "config.json").is_file()
        and not any((folder / f).is_file() for f in _WEIGHT_FILES)
    )


def layer_names(model: nn.Module) -> list[str]:
    """The names of the model's encoder/decoder layers, in forward order (see module doc);
    empty when the model holds no such list."""
    lists = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and name.rpartition(".")[2] in LAYER_LISTS
        and len(module) > 0
        and all(any(True for _ in child.children()) for child in module)
    ]
    # Lists of layers, not of a layer's parts (T5's blocks hold a list of sublayers named
    # "layer") nor of stages (Swin's stages hold its layers): their classes say which.
    layered = [
        n for n in lists
        if all(type(c).__name__.endswith(LAYER_CLASS_ENDINGS) for c in model.get_submodule(n))
    ]  # fmt: skip
    lists = layered or lists
    inner = [n for n in lists if not any(o.startswith(n + ".") for o in lists)]
    return [f"{n}.{i}" for n in inner for i in range(len(model.get_submodule(n)))]


def is_vision(model: nn.Module) -> bool:
    return getattr(model, "main_input_name", "input_ids") == "pixel_values"


def prefix_tokens(model: nn.Module) -> int:
    """Tokens a vision transformer puts before its patch tokens (class, distillation and
    register tokens), counted from its embedding parameters."""
    count = 0
    for name, param in model.named_parameters():
        leaf = name.rpartition(".")[2]
        if leaf in PREFIX_TOKEN_PARAMS and param.ndim == 3:
            count += int(param.shape[1])
    return count


def sequence_first(model: nn.Module) -> bool:
    """Whether the model's layers pass T x N x D hidden states (XLNet's)."""
    return getattr(getattr(model, "config", None), "model_type", "") in SEQUENCE_FIRST


def default_pool(model: nn.Module) -> tuple[str, int]:
    """(pool, prefix tokens) of an HF model's layers: vision -> tokens after the prefix
    tokens; text -> the mean over the real tokens."""
    if is_vision(model):
        return "tokens", prefix_tokens(model)
    return "mean", 0


def example_inputs(model: nn.Module, batch: int = 2, length: int = 8) -> Mapping | torch.Tensor:
    """A small batch the model accepts, on its device: pixel values for a vision model,
    else token ids (below the vocabulary size) with an all-ones attention mask. For
    `nclayers blocks hf:PATH` and for tracing a model's layers."""
    config = model.config
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    if is_vision(model):
        size = config.image_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return torch.randn(batch, config.num_channels, *size, generator=gen).to(device)
    vocab = int(getattr(config, "vocab_size", 100) or 100)
    ids = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


__all__ = [
    "PREFIX",
    "TASKS",
    "build_hf_model",
    "config_only",
    "default_pool",
    "example_inputs",
    "is_causal_lm",
    "is_hf_model",
    "is_hf_name",
    "layer_names",
    "prefix_tokens",
    "sequence_first",
    "task_of",
]
