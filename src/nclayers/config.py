"""Typed run configuration: validated sections, YAML files that compose, `key=value` overrides.

A config is data. `load_config("configs/resnet18-cifar10.yaml", ["train.lr=0.05"])` merges
defaults <- the YAML file (after the files its `base:` names) <- the overrides, validates
every value once (types, choices, ranges, element types of lists) and returns a new,
frozen `Config`; nothing passed in is changed. A bad value, an unknown key or malformed
YAML raises `NCLayersError` naming the key, the value, what is valid, and the file and
line it came from.

Settings that steer how a trained model is measured (`analyze.amp`, `analyze.channels_last`,
`probe.amp`, batch sizes) are apart from those that define the model (`data`, `model`,
`train`): `weights_settings(cfg)` lists the latter, which alone name a run.

A config file may start from others: `base: ../resnet18-cifar10.yaml` or a list of files,
merged in order (relative to the file), then the file's own keys on top. Keys may be
nested (`train: {lr: 0.1}`) or dotted (`train.lr: 0.1`).
"""

from __future__ import annotations

import contextvars
import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from nclayers.errors import NCLayersError

Split = Literal["train", "test"]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Unit = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]  # momentum, beta, smoothing

_VALIDATING: contextvars.ContextVar[bool] = contextvars.ContextVar("validating", default=False)
IMAGE_DATASETS = ("digits", "cifar10", "cifar100", "cifar10c", "imagenet", "folder")
CIFARN_SETS = ("aggre", "random1", "randn1", "random2", "random3", "worse", "worst", "noisy",
               "noisy100", "clean")  # fmt: skip
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"


class Section(BaseModel):
    """A config section: unknown keys are refused, values are checked, objects are frozen.
    Built directly (`DataConfig(noise=2)`), a bad value raises the same one-line
    `NCLayersError` as a config file does."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    _key: ClassVar[str] = ""  # the section's name in a Config ("data", "train", ...)

    def __init__(self, **values: Any) -> None:
        if _VALIDATING.get():  # a section of a config being validated: keep the locations
            super().__init__(**values)
            return
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise NCLayersError(_explain(err.errors(), "", (), type(self))) from None


class DataConfig(Section):
    _key: ClassVar[str] = "data"
    # digits | cifar10 | cifar100 | cifar10c | imagenet | folder | hf:PATH_OR_ID
    name: str = "digits"
    dir: str | None = None  # the local folder holding the data set
    download: bool = False  # let torchvision download CIFAR when the folder lacks it
    # Label noise: a rate in [0, 1] (shuffled labels) or a CIFAR-10N/100N label set.
    noise: Fraction | Literal[CIFARN_SETS] | None = None  # type: ignore[valid-type]
    noise_seed: int = 0
    noise_mode: Literal["shuffle", "uniform"] = "shuffle"
    # Corrupted inputs at severity 1..5 or the paper's level L1/L2/L3 (= 1/3/5), on the
    # training split (and the test split with corrupt_test); with cifar10c, which files.
    corruption: Literal[CORRUPTIONS] | None = None  # type: ignore[valid-type]
    severity: Annotated[int, Field(ge=1, le=5)] | Literal["L1", "L2", "L3"] | None = None
    corrupt_test: bool = False
    corruption_seed: int = 0
    train_subset: PositiveInt | None = None  # class-balanced subset sizes (null: all)
    test_subset: PositiveInt | None = None
    subset_seed: int = 0
    classes: PositiveInt | None = None  # keep the first N classes (sorted order)
    # Image folders (imagenet, folder): eval = resize short side, centre crop.
    image_size: PositiveInt = 224
    resize: PositiveInt = 256
    mean: list[float] | None = None  # per-channel, in [0, 1] units (null: ImageNet's)
    std: list[PositiveFloat] | None = None
    workers: NonNegativeInt | None = None  # file-reading processes (null: from the CPUs)
    decoder: Literal["auto", "torchvision", "pil", "device"] = "auto"  # JPEG decoding
    skip_bad: bool = False  # skip unreadable image files (and count them) instead of failing
    # Hugging Face data sets (data.name=hf:PATH_OR_ID): text for sequence models, images
    # (an image_column) for vision models.
    text_column: str = "text"
    label_column: str = "label"  # absent from a text data set: language-model text
    image_column: str = "image"
    max_length: PositiveInt | None = None  # tokens per sequence (null: the model's limit)
    # The tokenizer: a folder or hub id (null: the model's own, model.name's folder/id).
    tokenizer: str | None = None
    # The data set's splits that serve as train and test: names, or slices of one file
    # ("train[:90%]" / "train[90%:]"); e.g. test_split=validation where test has no labels.
    train_split: str = "train"
    test_split: str = "test"
    config_name: str | None = None  # a hub data set's configuration (e.g. glue's sst2)
    # Text batches: sorted by length within windows of this many batches (less padding),
    # padded on this side (left padding adds position_ids, as generation does).
    window: PositiveInt = 100
    padding_side: Literal["right", "left"] = "right"

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        if name in IMAGE_DATASETS or (name.startswith("hf:") and len(name) > 3):
            return name
        raise ValueError(f"expected one of {', '.join(IMAGE_DATASETS)} or hf:PATH_OR_ID")

    @field_validator("noise")
    @classmethod
    def _clean_labels_are_none(cls, noise):
        # 0 and "clean" say what null says: one setting, so that runs and stages compare
        # equal whichever spelling a sweep file used.
        return None if noise in CLEAN_LABELS else noise

    @field_validator("mean", "std")
    @classmethod
    def _three_channels(cls, value: list | None) -> list | None:
        if value is not None and len(value) not in (1, 3):
            raise ValueError("expected one value per channel (3, or 1 for greyscale)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.corruption and self.severity is None:
            raise ValueError(
                f"data.corruption={self.corruption!r} needs data.severity: 1..5 or the "
                "paper's level L1, L2, L3 (= 1, 3, 5)"
            )
        source = "hf:" if self.name.startswith("hf:") else self.name
        for key, sources in SOURCE_KEYS.items():
            value = getattr(self, key)
            if source not in sources and value != type(self).model_fields[key].default:
                where = ", ".join(s if s != "hf:" else "Hugging Face data (hf:PATH_OR_ID)"
                                  for s in sources)  # fmt: skip
                raise ValueError(
                    f"data.{key}={value!r} applies to {where}, not {self.name}: unset it"
                )
        if isinstance(self.noise, str) and self.noise != "clean" and self.name not in (
            "cifar10", "cifar100"
        ):  # fmt: skip
            raise ValueError(
                f"data.noise={self.noise!r}: human label sets exist for cifar10 (CIFAR-10N) "
                f"and cifar100 (CIFAR-100N), not {self.name}; or give a rate in [0, 1]"
            )
        return self


# Data keys that act on some data sources only (data.name; "hf:" any Hugging Face data):
# elsewhere a value other than the default would be ignored, so it is refused.
_IMAGE_FILES = ("imagenet", "folder", "hf:")  # decoded and resized per image
SOURCE_KEYS = {
    "download": ("cifar10", "cifar100"),
    **dict.fromkeys(("image_size", "resize", "mean", "std"), _IMAGE_FILES),
    **dict.fromkeys(("workers", "decoder", "skip_bad"), ("imagenet", "folder")),
    **dict.fromkeys(("text_column", "label_column", "image_column", "max_length", "tokenizer",
                     "train_split", "test_split", "config_name", "window", "padding_side"),
                    ("hf:",)),
}  # fmt: skip


class ModelConfig(Section):
    _key: ClassVar[str] = "model"
    name: str = "resnet18"  # registry name, 'package.module:function' or hf:PATH_OR_ID
    width: PositiveInt | None = None  # CIFAR ResNet width (64 standard)
    checkpoint: str | None = None  # weights to load (else the run folder's checkpoint.pt)
    # Measure the model as built (its random initialisation), on purpose: a stage that
    # measures a model otherwise refuses to run without trained weights.
    untrained: bool = False
    blocks: str | list[str] = "auto"  # "auto", or module names / glob patterns
    # Pooling of a block's output: nchw | nhwc | tokens | cls | flat; for sequences mean
    # (over real tokens) | cls (the tokenizer's cls token, else the first real token) |
    # last (the last real token). null: the model's own
    # (analyze.task=next_token always takes every position: "token").
    pool: Literal["nchw", "nhwc", "tokens", "cls", "flat", "mean", "last"] | None = None
    options: dict[str, Any] = Field(default_factory=dict)  # extra constructor keywords
    # Load model.checkpoint without its classifier: the model keeps its own head (sized
    # by the data's classes), e.g. an ImageNet backbone measured on CIFAR.
    skip_head: bool = False
    # Glob patterns of model keys not loaded from model.checkpoint ('fc.*,head.*').
    skip: list[str] = Field(default_factory=list)

    @field_validator("blocks", mode="before")
    @classmethod
    def _block_list(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "auto" and "," in value:
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("skip", mode="before")
    @classmethod
    def _skip_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return [] if value is None else value

    @field_validator("options")
    @classmethod
    def _options(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "num_classes" in value:
            raise ValueError(
                f"model.options.num_classes={value['num_classes']!r}: the head's size comes "
                "from the data's classes, not from an option; remove it (a checkpoint "
                "trained on other classes loads with model.skip_head=true)"
            )
        return value

    @model_validator(mode="after")
    def _skips(self) -> ModelConfig:
        if (self.skip_head or self.skip) and not self.checkpoint:
            key = "model.skip_head=true" if self.skip_head else f"model.skip={self.skip}"
            raise ValueError(
                f"{key} applies to the weights of model.checkpoint=FILE, which is not set; "
                "set it, or remove the skip"
            )
        if self.untrained and self.checkpoint:
            raise ValueError(
                f"model.untrained=true measures the model as built, model.checkpoint="
                f"{self.checkpoint!r} loads weights into it: unset one of them"
            )
        return self


class TrainConfig(Section):
    _key: ClassVar[str] = "train"
    epochs: PositiveInt = 200
    batch_size: PositiveInt = 128
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 0.1
    momentum: Unit = 0.9
    betas: tuple[Unit, Unit] = (0.9, 0.999)
    # The paper prints 0.05 for ResNet; 5e-4 is the standard value behind its accuracies.
    weight_decay: NonNegativeFloat = 5e-4
    schedule: Literal["multistep", "cosine", "constant", "linear"] = "multistep"
    milestones: list[PositiveInt] = Field(default_factory=lambda: [100, 150])
    gamma: PositiveFloat = 0.1
    warmup_epochs: NonNegativeInt = 0
    warmup_lr: PositiveFloat = 1e-4
    # Linear warm-up over this many optimiser steps, from lr/warmup_steps at the first step
    # up to lr (transformers' fine-tuning recipe, for runs of a few epochs); then the
    # schedule runs per step too (linear or cosine decay to min_lr over the other steps).
    # 0: the schedule moves once per epoch (warmup_epochs), as the image recipes do.
    warmup_steps: NonNegativeInt = 0
    min_lr: NonNegativeFloat = 1e-5
    label_smoothing: Unit = 0.0
    augment: bool = True
    seed: int = 0
    checkpoint_every: NonNegativeInt = 10  # epochs between checkpoints (0: only the last)
    track_nc_every: NonNegativeInt = 0  # NC of every block on a test subset every N epochs
    track_nc_samples: PositiveInt = 1000
    amp: bool = True  # bf16 autocast on CUDA (never on CPU)
    channels_last: bool = True  # convnets on CUDA
    compile: bool = False  # torch.compile the model (CUDA only)
    tensorboard: bool = True  # event files in the run folder when tensorboard is installed

    @model_validator(mode="after")
    def _schedule(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} is above train.lr={self.lr}")
        if self.warmup_steps and self.warmup_epochs:
            raise ValueError(
                f"train.warmup_steps={self.warmup_steps} and train.warmup_epochs="
                f"{self.warmup_epochs}: choose one warm-up (set the other to 0)"
            )
        if self.warmup_epochs >= self.epochs and self.warmup_epochs:
            raise ValueError(
                f"train.warmup_epochs={self.warmup_epochs} leaves no epoch after the "
                f"warm-up of train.epochs={self.epochs}"
            )
        return self


class AnalyzeConfig(Section):
    _key: ClassVar[str] = "analyze"
    split: Split = "test"  # the split measured
    reference: Split | None = "train"  # split whose class means define NCC; null: no NCC
    # A class-balanced subset of the reference split for those means (seeded by
    # data.subset_seed; null: all of it). ImageNet's 1.28 M training images are a pass 26
    # times as long as its 50 k validation images; 100 per class (100000) are twice as long.
    reference_subset: PositiveInt | None = None
    batch_size: PositiveInt = 500
    classic_nc1: bool = False  # also trace(Sigma_W Sigma_B^+)/K (D x D scatter per layer)
    amp: bool = True  # bf16 autocast on CUDA while measuring (never on CPU)
    channels_last: bool = True  # convnets on CUDA while measuring
    # classify: a sample's class is its label; next_token (causal LMs): every position is
    # a sample whose class is the token after it, among the top_k most frequent next
    # tokens of the reference split (else of the measured one), -1 (left out) otherwise.
    task: Literal["classify", "next_token"] = "classify"
    top_k: Annotated[int, Field(ge=2)] = 100

    @model_validator(mode="after")
    def _top_k_needs_next_token(self) -> AnalyzeConfig:
        if self.task == "classify" and self.top_k != type(self).model_fields["top_k"].default:
            raise ValueError(
                f"analyze.top_k={self.top_k} counts next-token classes, which "
                "analyze.task=classify does not use: unset it, or set analyze.task=next_token"
            )
        return self


class EqualityConfig(Section):
    _key: ClassVar[str] = "equality"
    split: Split = "test"  # the curve fitted (clean-data NC is measured on test, paper A.1)
    view: str = "clean"
    plateau_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5  # redundant: e < f x mean e
    plateau_min_run: PositiveInt = 2  # ... in runs of at least this many consecutive blocks
    bic_margin: NonNegativeFloat = 2.0  # the plateau fit must beat geometric decay by this


class PruneConfig(Section):
    _key: ClassVar[str] = "prune"
    # "plateau", or block indices / module names ("10,11,layer3.2")
    blocks: str | list[int | str] = "plateau"
    baselines: list[Literal["last", "random"]] = Field(default_factory=lambda: ["last", "random"])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])  # one random set per seed
    finetune_epochs: NonNegativeInt = 0  # fine-tune every variant (the unpruned one too)
    # Constant, with the run's own optimiser (train.*); null: the lr the run's schedule
    # ended with (train.lr times its factor in the last epoch, or the last step's where the
    # schedule runs per step), so the unpruned model fine-tuned alike keeps its accuracy.
    finetune_lr: PositiveFloat | None = None
    reference: Split | None = None  # split for the NCC accuracy (null: none)
    amp: bool = True
    # The removal rules compared side by side, each removing prune.n layers: plateau (the
    # NC rule), block_influence (ShortGPT), angular (Gromov et al., n consecutive layers),
    # last, random (one set per seed). null: plateau and prune.baselines, and for sequence
    # layers (transformers) block_influence and angular too.
    criteria: list[Literal["plateau", "block_influence", "angular", "last", "random"]] | None = None
    # Layers every criterion removes; null: as many as prune.blocks names (the plateau
    # blocks of the equality rule, or the list).
    n: PositiveInt | None = None
    # Where the angular distance is measured: each sequence's last real token (Gromov et
    # al.'s choice) or the mean over every real token.
    angular_position: Literal["last", "mean"] = "last"
    # Sequences of the training split the layer scores (block_influence, angular) are
    # computed on: the first N (calibration data, apart from the held-out test split).
    calibration_samples: PositiveInt = 1000

    @field_validator("blocks", mode="before")
    @classmethod
    def _block_list(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        if isinstance(value, str) and value != "plateau":
            return [int(v) if v.strip().isdigit() else v.strip() for v in value.split(",")
                    if v.strip()]  # fmt: skip
        return value


# The probe's default learning-rate grid: 100x around the paper's 0.1, five values.
DEFAULT_PROBE_LRS = (0.01, 0.03, 0.1, 0.3, 1.0)


class ProbeSettings(Section):
    """Linear probes on every block (paper A.1: 10 epochs, SGD momentum 0.9, lr divided by
    5 at epochs 5 and 7, batch 128, the recipe's crop + flip), with one head per learning
    rate of `lrs` on the same features, the lr chosen per block on a held-out part of the
    training split. The same object is the config's `probe:` section and the settings of
    `nclayers.probe(...)`: one place for the defaults and their checks."""

    _key: ClassVar[str] = "probe"

    epochs: PositiveInt = 10
    batch_size: PositiveInt = 128
    # One head per lr, all trained on the same forward pass; each block keeps the one that
    # scores best on the held-out rows (`choose_by`). The default spans 100x around the
    # paper's 0.1; `[0.1]` with `standardize: false` is the paper's recipe (nothing to
    # choose: no rows are held out).
    lrs: Annotated[list[PositiveFloat], Field(min_length=1)] = Field(
        default_factory=lambda: list(DEFAULT_PROBE_LRS)
    )
    # Share of the training split held out (class-balanced, seeded by `seed`) to choose
    # each block's lr; those rows never train a head. Used when `lrs` has several values.
    val_fraction: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = 0.1
    # What "best on the held-out rows" means: "loss", the lowest cross-entropy (ties: the
    # higher accuracy), or "accuracy", the highest accuracy (ties: the lower loss). The
    # loss ranks heads that tie on a few dozen rows' accuracy and charges a head that fitted
    # single training rows (memorised mislabelled images) for its confident mistakes.
    choose_by: Literal["loss", "accuracy"] = "loss"
    momentum: Unit = 0.9
    # "The same SGD parameters as in pre-training": the recipe's 5e-4 (see train.weight_decay).
    weight_decay: NonNegativeFloat = 5e-4
    milestones: list[PositiveInt] = Field(default_factory=lambda: [5, 7])
    gamma: PositiveFloat = 0.2
    augment: bool = True  # random crop + flip on the training images (stream mode)
    # Each feature centred and scaled (statistics of the unaugmented features over the
    # held-out rows, or as many drawn alike with one lr) before the heads: the same linear
    # classifiers (folded into nn.Linear), but one lr grid then suits every block, whose
    # features' scales differ by orders of magnitude. false: the paper's raw features.
    standardize: bool = True
    # The scale: "block", one per block (the root mean variance of its features: the
    # block's geometry, the one NCC measures in, is kept); "feature", each feature's own
    # standard deviation. Per feature, the CPU-mini ResNet18's last block fell 0.036 below
    # NCC; per block it is within 2 points.
    standardize_per: Literal["feature", "block"] = "block"
    mode: Literal["auto", "stream", "cache"] = "auto"  # auto: cache when augment is false
    cache_budget_gb: NonNegativeFloat = 4.0  # beyond it the cache is a memory-mapped file
    # Where that file goes (null: the run folder's probe_cache/ for `nclayers probe`; from
    # Python, none: a cache over the budget is refused).
    cache_dir: str | None = None
    cache_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    eval_batch_size: PositiveInt = 500
    view: str = "clean"  # the labels view the heads learn and are scored on (A.1: clean)
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA for the backbone (heads stay float32)
    channels_last: bool = True  # convnets on CUDA

    @model_validator(mode="before")
    @classmethod
    def _old_lr(cls, values: Any) -> Any:
        if isinstance(values, Mapping) and "lr" in values:
            raise ValueError(
                f"probe.lr={values['lr']!r} is now a list of learning rates: set "
                f"probe.lrs=[{values['lr']}] (one lr, the paper's recipe) or leave the grid; "
                "a run folder of an older nclayers converts with `nclayers upgrade RUN`"
            )
        return values


ProbeConfig = ProbeSettings  # the name of the config section before ProbeSettings


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    analyze: AnalyzeConfig = Field(default_factory=AnalyzeConfig)
    equality: EqualityConfig = Field(default_factory=EqualityConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    probe: ProbeSettings = Field(default_factory=ProbeSettings)
    device: Annotated[str, Field(pattern=DEVICE_PATTERN)] = "auto"  # auto | cpu | cuda[:N]
    run: str = ""  # a name for the run, written into every CSV row

    @model_validator(mode="after")
    def _task_pool(self) -> Config:
        if self.analyze.task == "next_token" and self.model.pool is not None:
            raise ValueError(
                f"model.pool={self.model.pool!r}: analyze.task=next_token measures every "
                "position of every layer (pool 'token'); leave model.pool unset (null)"
            )
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def updated(self, settings: Mapping[str, Any] | Sequence[str], where: str = "") -> Config:
        """A new config: this one with `settings` (a mapping of nested or dotted keys, or
        `key=value` texts) applied and validated."""
        if isinstance(settings, Mapping):
            return _validate(_merge(self.to_dict(), _nested(settings, where)), where)
        return load_config(None, settings, base=self)


# Sections that define a run's weights; the others only steer how it is measured.
WEIGHTS_SECTIONS = ("data", "model", "train")
# Keys of those sections that do not change the weights: where the data lies and how it
# is read, what the model is evaluated on, how often a checkpoint is written, TensorBoard.
NOT_WEIGHTS = ("data.dir", "data.download", "data.workers", "data.decoder", "data.skip_bad",
               "data.test_subset", "data.test_split", "data.corrupt_test", "model.pool",
               "model.blocks", "train.checkpoint_every", "train.tensorboard",
               "train.track_nc_every", "train.track_nc_samples")  # fmt: skip


# Every spelling of clean labels in data.noise; a config holds None for all of them.
CLEAN_LABELS = (None, "", 0, "clean")


def canonical_settings(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened settings recorded earlier, spelled as a config spells them now (clean
    labels as data.noise None), so that a comparison sees only real changes."""
    out = dict(flat)
    if "data.noise" in out and out["data.noise"] in CLEAN_LABELS:
        out["data.noise"] = None
    if len(out.get("probe.lrs") or ()) > 1 and "probe.choose_by" not in out:
        out["probe.choose_by"] = "accuracy"  # a grid probed before choose_by chose so
    if out.get("probe.standardize") and "probe.standardize_per" not in out:
        out["probe.standardize_per"] = "feature"  # standardised so before standardize_per
    return out


def weights_settings(cfg: Config) -> dict[str, Any]:
    """The flattened settings that define a run's trained weights."""
    flat = flatten(cfg.to_dict())
    return {
        k: v
        for k, v in flat.items()
        if k.split(".", 1)[0] in WEIGHTS_SECTIONS and k not in NOT_WEIGHTS
    }


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1} (model.options stays one value)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and key != "model.options":
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


# ----------------------------------------------------------------------------- loading
def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    base: Config | None = None,
) -> Config:
    """defaults (or `base`) <- YAML file <- `key=value` overrides, validated; a new object."""
    raw = base.to_dict() if base is not None else {}
    where = ""
    if path is not None:
        raw = _merge(raw, read_config_file(path))
        where = str(path)
    for text in overrides:
        key, value = parse_override(text)
        raw = _merge(raw, _nested({key: value}, f"override {text!r}"))
    return _validate(raw, where, overrides=tuple(overrides))


def compose(*layers: str | Path | Mapping | Sequence[str], where: str = "") -> Config:
    """One config from layers merged in order and validated once: config files (str or
    Path), mappings of settings (nested or dotted keys), lists of `key=value` texts."""
    raw: dict = {}
    overrides: list[str] = []
    for layer in layers:
        if isinstance(layer, (str, Path)):
            raw = _merge(raw, read_config_file(layer))
        elif isinstance(layer, Mapping):
            raw = _merge(raw, _nested(layer, where))
        else:
            for text in layer:
                key, value = parse_override(text)
                raw = _merge(raw, _nested({key: value}, f"override {text!r}"))
                overrides.append(text)
    return _validate(raw, where, tuple(overrides))


def read_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A config file's settings as a nested mapping, after the files its `base:` names."""
    path = Path(path)
    if not path.is_file():
        raise NCLayersError(f"config file {str(path)!r} does not exist")
    if path.resolve() in _seen:
        raise NCLayersError(f"{path}: `base:` files include each other ({path.name} again)")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise NCLayersError(f"{path}: expected a mapping of config keys at the top level")
    bases = data.pop("base", None) or []
    merged: dict = {}
    for name in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, read_config_file(path.parent / str(name), (*_seen, path.resolve())))
    return _merge(merged, _nested(data, str(path)))


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; malformed YAML names the file and the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise NCLayersError(f"{path}: unreadable ({err})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise NCLayersError(f"{path}:{line}: not valid YAML ({problem})") from None


def key_line(path: str | Path, dotted: str) -> int | None:
    """The line of `path` where the dotted key is set (nested or dotted spelling)."""
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    parts = dotted.split(".")

    def find(node, i: int) -> int | None:
        if not isinstance(node, yaml.MappingNode):
            return None
        for k, v in node.value:
            name = str(k.value)
            if name == ".".join(parts[i:]):
                return k.start_mark.line + 1
            if name == parts[i]:
                return find(v, i + 1) if i + 1 < len(parts) else k.start_mark.line + 1
            if "." in name and parts[i : i + name.count(".") + 1] == name.split("."):
                return find(v, i + name.count(".") + 1)
        return None

    def anywhere(node) -> int | None:  # e.g. a sweep file's config: or axes: entries
        found = find(node, 0)
        children = [v for _, v in node.value] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else [])  # fmt: skip
        for child in children if found is None else ():
            found = anywhere(child)
            if found is not None:
                break
        return found

    return anywhere(node)


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=0.05' -> ('train.lr', 0.05); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise NCLayersError(f"override {text!r}: expected key=value, e.g. train.epochs=15")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise NCLayersError(f"override {text!r}: the value is not valid YAML") from None
    if isinstance(value, str) and value.lower() not in ("nan", "inf", "-inf", ".nan", ".inf"):
        try:  # YAML 1.1 reads '1e-3' as a string; a number is meant
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def config_text(cfg: Config) -> str:
    """The YAML text of a config, as config.yaml holds it."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- helpers
def _nested(settings: Mapping, where: str) -> dict:
    """Dotted keys ('train.lr') unfolded into nested mappings, recursively."""
    if not isinstance(settings, Mapping):
        raise NCLayersError(f"{where}: expected a mapping of config keys, got {settings!r}")
    out: dict = {}
    for key, value in settings.items():
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise NCLayersError(f"{where}: {key!r} sets a key inside a value")
        leaf = parts[-1]
        if isinstance(value, Mapping) and ".".join(parts) != "model.options":
            value = _nested(value, where)
        node[leaf] = _merge(node[leaf], value) if isinstance(node.get(leaf), dict) else value
    return out


def _merge(a: dict, b: Mapping) -> dict:
    """`b` over `a`, recursively for mappings (so model.options keys add up); new dict."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _validate(raw: dict, where: str = "", overrides: tuple = ()) -> Config:
    token = _VALIDATING.set(True)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise NCLayersError(_explain(err.errors(), where, overrides)) from None
    finally:
        _VALIDATING.reset(token)


def _explain(
    errors: list[dict], where: str, overrides: tuple, root: type[BaseModel] | None = None
) -> str:
    """One line: the key, the value, what is valid, and where the value came from. The
    errors of one key (a union tried member by member) are told together."""
    first = errors[0]
    root = root or Config
    prefix = [root._key] if getattr(root, "_key", "") else []
    loc = _field_path(first["loc"], root, prefix)
    key = ".".join(loc)
    source = _source(key, where, overrides)
    if first["type"] == "extra_forbidden":
        section = _section_of(loc[:-1])
        valid = ", ".join(".".join([*loc[:-1], name]) for name in section.model_fields)
        return f"unknown config key {key!r}{source}; valid keys here: {valid}"
    same = [e for e in errors if _field_path(e["loc"], root, prefix) == loc]
    messages = list(dict.fromkeys(_message(e) for e in same))
    message = "; or ".join(messages)
    value = first.get("input")
    if first["type"] != "missing" and key and not isinstance(value, dict):
        if not isinstance(value, list) or len(str(value)) < 60:
            return f"{key}={_show(value)}: {message}{source}"
    return f"{message}{source}" if first["type"] == "value_error" else f"{key}: {message}{source}"


def _message(error: dict) -> str:
    text = error["msg"].removeprefix("Value error, ")
    return text[0].lower() + text[1:] if text else text


def _field_path(loc: tuple, root: type[BaseModel] | None = None, prefix=()) -> list[str]:
    """The config key of a pydantic error location (union members and tags dropped)."""
    model: type[BaseModel] | None = root or Config
    out: list[str] = list(prefix)
    for part in loc:
        if isinstance(part, int):
            out.append(str(part))
        elif model is not None and part in model.model_fields:
            out.append(part)
            ann = model.model_fields[part].annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        elif model is not None:  # an unknown key
            out.append(str(part))
            model = None
    return out


def _section_of(path: list[str]) -> type[BaseModel]:
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        model = ann
    return model


def _source(key: str, where: str, overrides: tuple) -> str:
    for text in reversed(overrides):  # the last override of a key is the one that holds
        given = parse_override(text)[0]
        if given == key or given.startswith(key + ".") or key.startswith(given + "."):
            return f" (from the override {text!r})"
    if where and Path(where).is_file():
        line = key_line(where, key) if key else None
        return f" (in {where}" + (f", line {line})" if line else ")")
    return f" (in {where})" if where else ""


def _show(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value) if isinstance(value, str) else str(value)


__all__ = [
    "AnalyzeConfig",
    "Config",
    "DataConfig",
    "EqualityConfig",
    "ModelConfig",
    "ProbeConfig",
    "ProbeSettings",
    "PruneConfig",
    "TrainConfig",
    "compose",
    "config_text",
    "flatten",
    "load_config",
    "parse_override",
    "read_config_file",
    "read_yaml",
    "weights_settings",
]
