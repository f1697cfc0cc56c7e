"""Typed run configuration: dataclasses, YAML files and `key=value` overrides.

A config is data: `load_config("configs/resnet18-cifar10.yaml", ["train.lr=0.05"])`
merges defaults <- YAML file <- overrides, checks every key and value type, and returns
a `Config`. Unknown keys fail with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nclayers.errors import NCLayersError


@dataclass
class DataConfig:
    name: str = "digits"  # digits | cifar10 | cifar100 | cifar10c (the official release)
    dir: str | None = None  # local folder with the data set (e.g. ../shared/data)
    download: bool = False  # let torchvision download CIFAR when the folder lacks it
    noise: Any = None  # label noise: a rate in [0, 1] (shuffled labels) or a CIFAR-10N set
    noise_seed: int = 0
    noise_mode: str = "shuffle"  # shuffle (among the chosen samples) | uniform (other class)
    # Corrupted inputs: gaussian_noise | shot_noise | impulse_noise | speckle_noise, at
    # severity 1..5 or the paper's level L1/L2/L3 (= 1/3/5), on the training split (and on
    # the test split when corrupt_test); with cifar10c, which of the release's files.
    corruption: str | None = None
    severity: Any = None
    corrupt_test: bool = False
    corruption_seed: int = 0
    train_subset: int | None = None  # class-balanced subset sizes (None = all)
    test_subset: int | None = None
    subset_seed: int = 0


@dataclass
class ModelConfig:
    name: str = "resnet18"  # registry name or 'package.module:function'
    width: int | None = None  # CIFAR ResNet width (64 standard)
    checkpoint: str | None = None  # weights to load before analysis or training
    blocks: Any = "auto"  # "auto", or module names / glob patterns
    pool: str | None = None  # force a pooling: nchw | nhwc | tokens | cls | flat
    options: dict = field(default_factory=dict)  # extra constructor keywords


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    # The paper prints 0.05 for ResNet; 5e-4 is the standard value behind its accuracies.
    weight_decay: float = 5e-4
    schedule: str = "multistep"  # multistep | cosine | constant
    milestones: list = field(default_factory=lambda: [100, 150])
    gamma: float = 0.1
    warmup_epochs: int = 0
    warmup_lr: float = 1e-4
    min_lr: float = 1e-5
    label_smoothing: float = 0.0
    augment: bool = True
    seed: int = 0
    checkpoint_every: int = 10
    track_nc_every: int = 0  # measure every block's NC on a test subset every N epochs
    track_nc_samples: int = 1000
    amp: bool = True  # bf16 autocast on CUDA (never on CPU)
    channels_last: bool = True  # convnets on CUDA
    compile: bool = False  # torch.compile the model (CUDA only)
    tensorboard: bool = True  # event files in OUT/tb when tensorboard is installed


@dataclass
class AnalyzeConfig:
    split: str = "test"  # the split measured
    reference: str | None = "train"  # split whose class means define NCC; None for no NCC
    batch_size: int = 500
    classic_nc1: bool = False  # also trace(Sigma_W Sigma_B^+)/K (D x D scatter per layer)


@dataclass
class EqualityConfig:
    split: str = "test"  # the curve fitted (clean-data NC is measured on test, paper A.1)
    view: str = "clean"
    plateau_fraction: float = 0.5  # redundant: enhancement < fraction x the mean enhancement
    plateau_min_run: int = 2  # ... in runs of at least this many consecutive blocks
    bic_margin: float = 2.0  # the plateau fit must beat geometric decay by this much BIC


@dataclass
class PruneConfig:
    blocks: Any = "plateau"  # "plateau", or block indices / module names ("10,11,layer3.2")
    baselines: list = field(default_factory=lambda: ["last", "random"])
    seeds: list = field(default_factory=lambda: [0, 1, 2])  # one random baseline per seed
    finetune_epochs: int = 0  # fine-tune every variant (the unpruned one too) this long
    finetune_lr: float = 0.01  # constant; the optimiser settings are the run's train.*
    reference: str | None = None  # split for the NCC accuracy (None: one pass per variant)


@dataclass
class ProbeConfig:
    """Linear probes on every block (paper A.1): 10 epochs, SGD momentum 0.9, lr 0.1
    divided by 5 at epochs 5 and 7, batch 128, the recipe's crop + flip."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    # "The same SGD parameters as in pre-training": the recipe's 5e-4 (see train.weight_decay).
    weight_decay: float = 5e-4
    milestones: list = field(default_factory=lambda: [5, 7])
    gamma: float = 0.2
    augment: bool = True  # random crop + flip on the training images (stream mode)
    standardize: bool = False  # per-feature mean/std of the training features first
    mode: str = "auto"  # stream | cache | auto (cache when augment is false)
    cache_budget_gb: float = 4.0  # beyond it the cache is a memory-mapped file in the run
    eval_batch_size: int = 500
    seed: int = 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    equality: EqualityConfig = field(default_factory=EqualityConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    out: str = "runs/run"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    run: str = ""  # a name for the run, written into every CSV row

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check (and where lossless, convert) a value against a field's annotation."""
    hint = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if hint in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise NCLayersError(errors[0] if errors else f"{key}: bad value {value!r}")
    target = hint or annotation
    if target is float and isinstance(value, str):
        try:  # YAML 1.1 reads '1e-3' as a string
            value = float(value)
        except ValueError:
            pass
    if target is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if target is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if target is list and isinstance(value, tuple):
        return list(value)
    if isinstance(value, target) and not (target is int and isinstance(value, bool)):
        return value
    raise NCLayersError(
        f"{key}={value!r}: expected {getattr(target, '__name__', target)}, "
        f"got {type(value).__name__}"
    )


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise NCLayersError(
                f"unknown config key {full!r}; valid keys here: "
                f"{', '.join(prefix + n for n in sorted(names))}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise NCLayersError(f"{full}: expected a mapping of its keys, got {value!r}")
            _apply(current, value, f"{full}.")
        elif isinstance(current, dict) and isinstance(value, dict):
            setattr(obj, key, {**current, **value})  # model.options.x=1 adds to the others
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=0.05' -> ('train.lr', 0.05); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise NCLayersError(f"override {text!r}: expected key=value, e.g. train.epochs=15")
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):
        try:  # YAML 1.1 reads '1e-3' as a string; a number is meant
            value = float(value) if value.lower() not in ("nan", "inf", "-inf") else value
        except ValueError:
            pass
    return key.strip(), value


def nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: Config | None = None,
) -> Config:
    """defaults (or `base`) <- YAML file <- `key=value` overrides, all type-checked."""
    cfg = base or Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise NCLayersError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise NCLayersError(f"config file {str(path)!r}: expected a mapping at the top level")
        _apply(cfg, loaded)
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, nest(key, value))
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def apply_settings(cfg: Config, settings: dict, where: str = "settings") -> Config:
    """Apply a mapping of settings to `cfg` in place: nested (`{"train": {"lr": 0.1}}`)
    or dotted (`{"train.lr": 0.1}`) keys, type-checked like overrides. `where` names the
    source in error messages (e.g. a sweep file)."""
    if not isinstance(settings, dict):
        raise NCLayersError(f"{where}: expected a mapping of config keys, got {settings!r}")
    for key, value in settings.items():
        try:
            _apply(cfg, nest(str(key), value))
        except ValueError as err:
            raise NCLayersError(f"{where}: {err}") from None
    return cfg
