"""Text data sets for Hugging Face models: loading, tokenising, length-bucketed batches,
next-token classes.

- `load_text(source, split, tokenizer, text_column=, label_column=)` reads a split
  through `datasets` (data.name=hf:PATH_OR_ID): a `save_to_disk` folder (a DatasetDict:
  its splits by name), a folder of data files (CSV, TSV, JSON lines, JSON, Parquet,
  plain text; a file belongs to the split its name starts with: train.csv,
  test-00000.parquet), one data file (the split "train"; slices such as "train[90%:]"
  carve a held-out part out of it), or a hub id where the machine is online. The texts
  are tokenised once with the model's own tokenizer (a `transformers` tokenizer, a
  `tokenizers.Tokenizer`, or a folder/hub id for `AutoTokenizer`) and kept as one flat
  tensor of token ids with offsets (`TextData`).
- Labels: a `ClassLabel` column keeps its names; integer labels are class indices;
  text labels are numbered by `classes` (given, e.g. the training split's) or sorted.
  Without a label column the data serve language modelling (no labels views).
- `TextBatches` yields (inputs, labels) like `DeviceBatches`: inputs a dict of
  `input_ids` and `attention_mask` on the device, padded to the longest sequence of the
  batch (right or left), labels the single view's tensor or a dict of views. Sequences
  are sorted by length within windows of `window` batches so padding stays small; the
  order is drawn from the seed and epoch (`set_epoch`), so it is deterministic. Shards
  for torch.distributed as `DeviceBatches` does.
- Next-token classes (analyze.task=next_token): `count_next_tokens` counts, over a split,
  the tokens that follow another token; `NextTokenClasses.from_counts(counts, top_k)`
  keeps the K most frequent, numbered 0..K-1 by frequency (ties by token id); a
  position's class is the class of the token that follows it, -1 where that token is
  not among them, where the position is padding, and at each sequence's last token.

`datasets`, `tokenizers` and `transformers` are imported only by the functions that
need them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from nclayers.errors import NCLayersError

log = logging.getLogger("nclayers.data")
PREFIX = "hf:"
# Data-file suffixes and the `datasets` builder that reads them.
FORMATS = {
    ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
    ".txt": "text",
}  # fmt: skip
NEXT_TOKEN_VIEW = "clean"  # the next tokens are the true labels of a position
PADDING_SIDES = ("right", "left")


# ----------------------------------------------------------------------------- data
@dataclass
class TextData:
    """Tokenised sequences of one split: `ids` all token ids one after the other (int64),
    `offsets` the N+1 starts, `labels` view -> N class indices (none for language
    modelling), `classes` the class names, `pad_id` the tokenizer's padding id,
    `vocab_size` its vocabulary size (at least the largest id + 1) and `cls_id` its cls
    token (None: it has none; pool "cls" reads that token of each sequence). `window` and
    `padding_side` are the defaults of its `TextBatches` (data.window, data.padding_side);
    `meta` what the loading recorded (e.g. label noise)."""

    ids: torch.Tensor
    offsets: torch.Tensor
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    pad_id: int = 0
    vocab_size: int = 0
    name: str = ""
    split: str = ""
    window: int = 100
    padding_side: str = "right"
    meta: dict = field(default_factory=dict)
    cls_id: int | None = None

    def __post_init__(self) -> None:
        if (
            self.offsets.ndim != 1
            or len(self.offsets) < 1
            or int(self.offsets[-1]) != len(self.ids)
        ):
            raise NCLayersError(
                f"offsets: expected N+1 starts ending at len(ids)={len(self.ids)}, got "
                f"{tuple(self.offsets.shape)}"
            )
        for view, y in self.labels.items():
            if y.shape != (len(self),):
                raise NCLayersError(
                    f"labels view {view!r}: shape {tuple(y.shape)} != ({len(self)},)"
                )
        if len(self.ids):
            self.vocab_size = max(self.vocab_size, int(self.ids.max()) + 1)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def views(self) -> list[str]:
        return list(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sequence(self, i: int) -> list[int]:
        return self.ids[int(self.offsets[i]) : int(self.offsets[i + 1])].tolist()

    def subset(self, index: Sequence[int] | torch.Tensor) -> TextData:
        """The sequences at `index`, in that order."""
        index = torch.as_tensor(index, dtype=torch.int64)
        lengths = self.lengths[index]
        # Every token of the chosen sequences at once: each sequence's start, repeated over
        # its length, plus the position within it.
        starts = torch.repeat_interleave(self.offsets[:-1][index], lengths)
        offsets = _offsets(lengths.tolist())
        within = torch.arange(int(lengths.sum())) - torch.repeat_interleave(offsets[:-1], lengths)
        return replace(
            self, ids=self.ids[starts + within], offsets=offsets,
            labels={v: y[index] for v, y in self.labels.items()}, classes=list(self.classes),
            meta=dict(self.meta),
        )  # fmt: skip

    def with_views(self, labels: dict[str, torch.Tensor]) -> TextData:
        """The same sequences with other labels views (e.g. clean and noisy)."""
        return replace(self, labels=dict(labels), meta=dict(self.meta))

    def without_labels(self) -> TextData:
        """The same sequences as language-model text (no labels views)."""
        return replace(self, labels={}, classes=[], meta=dict(self.meta))


def _offsets(lengths: Sequence[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    if len(lengths):
        out[1:] = torch.as_tensor(list(lengths), dtype=torch.int64).cumsum(0)
    return out


# ----------------------------------------------------------------------------- loading
def _datasets():
    try:
        import datasets
    except ImportError:
        raise NCLayersError(
            'data.name=hf:...: the Hugging Face extra is not installed; pip install -e ".[hf]"'
        ) from None
    datasets.disable_progress_bars()
    return datasets


def _split_files(folder: Path, split: str) -> list[str]:
    base = split.split("[")[0]
    return sorted(
        str(f) for f in folder.iterdir()
        if f.is_file() and f.suffix in FORMATS and f.stem.split("-")[0].split(".")[0] == base
    )  # fmt: skip


def _file_split(builder_files: dict[str, list[str]], split: str, source: str):
    datasets = _datasets()
    files = next(iter(builder_files.values()))
    builders = {FORMATS[Path(f).suffix] for f in files}
    if len(builders) > 1:
        raise NCLayersError(
            f"data.name={source!r}: split {split!r} mixes formats {sorted(builders)}; keep one"
        )
    builder = builders.pop()
    options = {"delimiter": "\t"} if all(f.endswith(".tsv") for f in files) else {}
    try:
        return datasets.load_dataset(builder, data_files=builder_files, split=split, **options)
    except ValueError as err:  # e.g. a bad slice
        raise NCLayersError(f"data.name={source!r}: split {split!r}: {err}") from None


def load_split(source: str, split: str = "train", config_name: str | None = None):
    """The `datasets.Dataset` of `split` from `source` (see the module doc); `config_name`
    names a hub data set's configuration (e.g. glue's "sst2")."""
    datasets = _datasets()
    source = source.removeprefix(PREFIX)
    path = Path(source).expanduser()
    saved_folder = path.is_dir() and any(
        (path / f).is_file() for f in ("dataset_dict.json", "state.json")
    )
    if saved_folder and "[" in split:
        raise NCLayersError(
            f"split={split!r}: slices apply to data files; a save_to_disk folder is read by "
            "split name (save the held-out part as a split of its own)"
        )
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        saved = datasets.load_from_disk(str(path))
        if split not in saved:
            raise NCLayersError(
                f"split={split!r}: {source} holds the splits {sorted(saved)}; choose one"
            )
        return saved[split]
    if path.is_dir() and (path / "state.json").is_file():
        return _only_split(datasets.load_from_disk(str(path)), split, source)
    if path.is_dir():
        files = _split_files(path, split)
        if not files:
            found = sorted(f.name for f in path.iterdir() if f.suffix in FORMATS)
            raise NCLayersError(
                f"split={split!r}: no data file in {source} is named after it (found {found});"
                f" name files {split.split('[')[0]}.csv, .jsonl, .parquet or .txt"
            )
        return _file_split({split.split("[")[0]: files}, split, source)
    if path.is_file():
        if path.suffix not in FORMATS:
            raise NCLayersError(
                f"data.name={source!r}: unknown file type {path.suffix!r}; use one of "
                f"{sorted(FORMATS)}"
            )
        if split.split("[")[0] != "train":
            raise NCLayersError(
                f"split={split!r}: one data file is the split 'train'; carve a held-out part "
                "with a slice (split='train[90%:]') or give a folder with train.* and test.*"
            )
        return _file_split({"train": [str(path)]}, split, source)
    try:  # a hub id, where the machine is online
        return datasets.load_dataset(source, config_name, split=split)
    except Exception as err:  # offline, an unknown id, no such split: one message
        raise NCLayersError(
            f"data.name={source!r}: not a local folder or file, and not loadable from the hub "
            f"({type(err).__name__}: {err})"
        ) from None


def _only_split(ds, split: str, source: str):
    if split not in ("train", str(getattr(ds, "split", None) or "train")):
        raise NCLayersError(
            f"split={split!r}: {source} is one saved Dataset (the split 'train'); save a "
            "DatasetDict with its splits instead"
        )
    return ds


# ----------------------------------------------------------------------------- tokenising
def load_tokenizer(spec):
    """A tokenizer object as it is, or `AutoTokenizer.from_pretrained(spec)` for a folder
    or hub id (an `hf:` prefix is dropped)."""
    if not isinstance(spec, (str, Path)):
        return spec
    spec = str(spec)
    spec = spec.removeprefix(PREFIX)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise NCLayersError(
            'tokenizer: transformers is not installed; pip install -e ".[hf]"'
        ) from None
    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as err:
        raise NCLayersError(
            f"tokenizer {spec!r}: cannot be loaded ({err}); give the model's folder (with its "
            "tokenizer files) or a hub id on a machine that is online"
        ) from None


def _is_raw(tokenizer) -> bool:
    """A `tokenizers.Tokenizer` (not a transformers wrapper around one)."""
    return hasattr(tokenizer, "encode_batch") and not callable(
        getattr(tokenizer, "convert_tokens_to_ids", None)
    )


def encode(tokenizer, texts: Sequence[str], max_length: int | None = 512) -> list[list[int]]:
    """Token ids of each text with the tokenizer's special tokens, cut at `max_length`."""
    texts = [str(t) for t in texts]
    if _is_raw(tokenizer):
        ids = [e.ids for e in tokenizer.encode_batch(texts)]
    else:
        ids = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    return [list(x[:max_length]) if max_length else list(x) for x in ids]


def pad_id_of(tokenizer) -> int:
    """The tokenizer's padding id; else its end-of-text id; else 0. The attention mask
    marks padding, so the id only has to be a valid one."""
    if _is_raw(tokenizer):
        padding = tokenizer.padding
        if padding and padding.get("pad_id") is not None:
            return int(padding["pad_id"])
        for token in ("[PAD]", "<pad>", "<|endoftext|>", "</s>"):
            if tokenizer.token_to_id(token) is not None:
                return int(tokenizer.token_to_id(token))
        return 0
    for attr in ("pad_token_id", "eos_token_id"):
        if getattr(tokenizer, attr, None) is not None:
            return int(getattr(tokenizer, attr))
    return 0


def cls_id_of(tokenizer) -> int | None:
    """The tokenizer's cls token id (a transformers tokenizer's `cls_token_id`), or None
    (it names none, or it is a raw `tokenizers.Tokenizer`, which names no special role)."""
    if _is_raw(tokenizer):
        return None
    cls_id = getattr(tokenizer, "cls_token_id", None)
    return int(cls_id) if cls_id is not None else None


def vocab_size_of(tokenizer) -> int:
    if _is_raw(tokenizer):
        return int(tokenizer.get_vocab_size(with_added_tokens=True))
    return len(tokenizer)


def class_labels(values: list, classes: Sequence[str] | None, column: str) -> tuple:
    """(labels tensor, class names) of a label column's values: integers are class
    indices (classes "0".."K-1" unless named), names are numbered by `classes` (given)
    or in sorted order."""
    if all(isinstance(v, (int, bool)) for v in values):
        y = torch.as_tensor(values, dtype=torch.int64)
        if classes is None:
            classes = [str(i) for i in range(int(y.max()) + 1 if len(y) else 0)]
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            raise NCLayersError(
                f"data.label_column={column!r}: labels {int(y.min())}..{int(y.max())} are not "
                f"all classes 0..{len(classes) - 1} (a split without labels, e.g. a hub "
                "test split marked -1, cannot be measured: choose another by data.test_split)"
            )
        return y, list(classes)
    names = [str(v) for v in values]
    classes = list(classes) if classes is not None else sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise NCLayersError(
            f"data.label_column={column!r}: labels {unknown[:5]} are not among the classes "
            f"{classes[:10]}; take the classes from the training split"
        )
    return torch.as_tensor([index[n] for n in names], dtype=torch.int64), classes


def from_texts(
    texts: Sequence[str],
    tokenizer,
    labels: Sequence | None = None,
    *,
    classes: Sequence[str] | None = None,
    max_length: int | None = 512,
    label_column: str = "label",
    name: str = "",
    split: str = "",
) -> TextData:
    """Tokenise `texts` (and number their `labels`, if any, into the view "clean").
    Texts that give no token at all are left out, with their labels."""
    import itertools

    import numpy as np

    tokenizer = load_tokenizer(tokenizer)
    if labels is not None and len(labels) != len(texts):
        raise NCLayersError(f"labels: {len(labels)} labels for {len(texts)} texts")
    ids = encode(tokenizer, texts, max_length)
    keep = [i for i, x in enumerate(ids) if x]
    flat = np.fromiter(itertools.chain.from_iterable(ids[i] for i in keep), dtype=np.int64)
    views = {}
    if labels is not None:
        y, classes = class_labels(list(labels), classes, label_column)
        views = {"clean": y[torch.as_tensor(keep, dtype=torch.int64)]}
    cls_id = cls_id_of(tokenizer)
    if cls_id is not None:
        _warn_without_cls([ids[i] for i in keep], cls_id, max_length)
    return TextData(
        torch.from_numpy(flat), _offsets([len(ids[i]) for i in keep]), views,
        list(classes or []), pad_id_of(tokenizer), vocab_size_of(tokenizer), name, split,
        cls_id=cls_id,
    )  # fmt: skip


def _warn_without_cls(ids: list[list[int]], cls_id: int, max_length: int | None) -> None:
    """Log, once per split, the sequences that lack the tokenizer's cls token while
    others hold it (cut at max_length, where the tokenizer appends it, as XLNet's does):
    pool "cls" reads their first real token instead."""
    lacking = sum(cls_id not in x for x in ids)
    if 0 < lacking < len(ids):
        log.warning(
            "%d of %d sequences lack the tokenizer's cls token (id %d), e.g. cut at "
            "data.max_length=%s: model.pool=cls reads their first real token; raise "
            "data.max_length to keep it", lacking, len(ids), cls_id, max_length,
        )  # fmt: skip


def checked_rows(ds, columns: dict[str, str], source: str, split: str, limit: int | None):
    """`ds` (its first `limit` rows) once each of `columns` ({config key: column}) is one
    of its columns; else the error names the key, the source and the columns there are."""
    for key, column in columns.items():
        if column not in ds.column_names:
            raise NCLayersError(
                f"data.{key}={column!r}: not a column of {source} ({split}); its columns "
                f"are {ds.column_names}"
            )
    return ds if limit is None else ds.select(range(min(int(limit), len(ds))))


def class_names(ds, label_column: str, classes: Sequence[str] | None) -> Sequence[str] | None:
    """`classes` if given, else the names of a datasets ClassLabel column (else None)."""
    feature = ds.features[label_column]
    if classes is None and hasattr(feature, "names"):
        return list(feature.names)
    return classes


def load_text(source: str, split: str = "train", tokenizer=None, **options) -> TextData:
    """Read `split` of `source` (see the module doc) and tokenise it: `dataset_text` of
    the split read, `options` its keywords (text_column, label_column, classes,
    max_length, limit)."""
    if tokenizer is None:
        raise NCLayersError("tokenizer: give the model's tokenizer (or its folder / hub id)")
    return dataset_text(load_split(source, split), tokenizer, source=source, split=split,
                        **options)  # fmt: skip


def dataset_text(
    ds,
    tokenizer,
    *,
    source: str = "",
    split: str = "",
    text_column: str = "text",
    label_column: str | None = "label",
    classes: Sequence[str] | None = None,
    max_length: int | None = 512,
    limit: int | None = None,
) -> TextData:
    """A `datasets.Dataset` already read (`source`, `split`: its names) as `TextData`.

    label_column: the class of each text (a ClassLabel, integers or names); absent from
        the data (or None): no labels, for language modelling. classes: the class names
        to number text labels by (give the training split's to the test split).
    limit: keep the first `limit` rows.
    """
    ds = checked_rows(ds, {"text_column": text_column}, source, split, limit)
    labels = None
    if label_column and label_column in ds.column_names:
        classes = class_names(ds, label_column, classes)
        labels = ds[label_column]
    return from_texts(
        ds[text_column], tokenizer, labels, classes=classes, max_length=max_length,
        label_column=label_column or "label", name=str(source), split=split,
    )  # fmt: skip


# ----------------------------------------------------------------------------- next tokens
def count_next_tokens(data: TextData, vocab_size: int | None = None) -> torch.Tensor:
    """int64 counts per vocabulary id of the tokens that follow another token in the
    split's sequences (every token but each sequence's first), as the batches show them
    (after truncation)."""
    size = max(int(vocab_size or 0), data.vocab_size)
    counts = torch.bincount(data.ids, minlength=size)
    firsts = data.ids[data.offsets[:-1][data.lengths > 0]]
    return counts - torch.bincount(firsts, minlength=size)


class NextTokenClasses:
    """The K most frequent next tokens of a split as classes 0..K-1 (most frequent first,
    ties by the smaller token id): `tokens` their vocabulary ids, `counts` their counts.
    `labels(input_ids, attention_mask)` gives each position the class of the token that
    follows it, or -1."""

    def __init__(self, tokens: torch.Tensor, counts: torch.Tensor, vocab_size: int) -> None:
        self.tokens = tokens.to(torch.int64)
        self.counts = counts
        self.vocab_size = int(vocab_size)
        self._lookup: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_counts(cls, counts: torch.Tensor, top_k: int) -> NextTokenClasses:
        counts = torch.as_tensor(counts)
        distinct = int((counts > 0).sum())
        if not 2 <= int(top_k) <= distinct:
            raise NCLayersError(
                f"analyze.top_k={top_k}: the split has {distinct} distinct next tokens; "
                f"choose top_k between 2 and {distinct}"
            )
        ids = torch.arange(len(counts))
        # A stable sort of the negated counts keeps the smaller id first among ties.
        order = torch.sort(-counts.to(torch.float64), stable=True).indices[: int(top_k)]
        return cls(ids[order], counts[order], len(counts))

    @property
    def num_classes(self) -> int:
        return len(self.tokens)

    def lookup(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """vocab_size int64: each vocabulary id's class, -1 for the others."""
        device = torch.device(device)
        if device not in self._lookup:
            table = torch.full((self.vocab_size,), -1, dtype=torch.int64)
            table[self.tokens] = torch.arange(len(self.tokens))
            self._lookup[device] = table.to(device)
        return self._lookup[device]

    def labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """N x T int64: the class of the token after each position, -1 where that token is
        not a class, where either position is padding, and at the last position."""
        nxt = self.lookup(input_ids.device)[input_ids[:, 1:]]
        real = (attention_mask[:, :-1] != 0) & (attention_mask[:, 1:] != 0)
        out = torch.full_like(input_ids, -1, dtype=torch.int64)
        out[:, :-1] = torch.where(real, nxt, -1)
        return out


# ----------------------------------------------------------------------------- batches
class TextBatches:
    """Iterate (inputs, labels) batches of a `TextData` on `device` (see the module doc).

    inputs: {"input_ids", "attention_mask"} N x T int64, padded to the batch's longest
    sequence on `padding_side` (left padding adds `position_ids` counting real tokens,
    so a causal model sees the positions it would see unpadded).
    labels: with `next_token` (NextTokenClasses), the N x T next-token classes (view
    "clean") and `token_classes` is set for `analyze`; else the data's views (one view:
    its tensor; several: a dict); data without labels give None.
    window, padding_side: default to the data's (data.window, data.padding_side).
    """

    def __init__(
        self,
        data: TextData,
        batch_size: int,
        device: torch.device | str = "cpu",
        *,
        train: bool = False,
        shuffle: bool | None = None,
        seed: int = 0,
        views: list[str] | None = None,
        window: int | None = None,
        padding_side: str | None = None,
        pad_id: int | None = None,
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
        next_token: NextTokenClasses | None = None,
    ) -> None:
        window = data.window if window is None else window
        padding_side = padding_side or data.padding_side
        if batch_size < 1:
            raise NCLayersError(f"batch_size={batch_size}: must be a positive integer")
        if window < 1:
            raise NCLayersError(f"window={window}: sort within at least 1 batch")
        if padding_side not in PADDING_SIDES:
            raise NCLayersError(f"padding_side={padding_side!r}: choose one of {PADDING_SIDES}")
        if len(data) == 0:
            raise NCLayersError(f"data: {data.name or 'the split'} holds no sequence")
        self.device = torch.device(device)
        self.data = data
        self.ids = data.ids.to(self.device)
        self.starts = data.offsets[:-1].to(self.device)
        self.lengths_host = data.lengths
        self.lengths = self.lengths_host.to(self.device)
        self.next_token = next_token
        self.token_classes = next_token.tokens if next_token is not None else None
        if next_token is not None:
            self.views, self.labels = [NEXT_TOKEN_VIEW], {}
        else:
            self.views = list(views or data.views)
            missing = [v for v in self.views if v not in data.labels]
            if missing:
                raise NCLayersError(f"views {missing}: data set has views {data.views}")
            self.labels = {v: data.labels[v].to(self.device) for v in self.views}
        self.batch_size, self.window, self.padding_side = batch_size, window, padding_side
        self.pad_id = data.pad_id if pad_id is None else int(pad_id)
        self.cls_id = data.cls_id  # read by the taps: pool "cls" (nclayers.taps.Taps)
        self.train = train
        self.shuffle = train if shuffle is None else shuffle
        self.seed, self.drop_last = seed, drop_last
        self.rank, self.world = shard
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def shard_size(self) -> int:
        """Sequences this rank draws per epoch (training shards are padded to equal size)."""
        n = len(self.data)
        if self.world == 1:
            return n
        if self.train:
            return -(-n // self.world)
        return len(range(self.rank, n, self.world))

    @property
    def samples_per_epoch(self) -> int:
        return len(self) * self.batch_size if self.drop_last else self.shard_size

    def __len__(self) -> int:
        n = self.shard_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self) -> torch.Tensor:
        n = len(self.data)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.world > 1:
            if self.train:  # DDP steps in lockstep: equal shards, padded by wrapping
                per = -(-n // self.world)
                order = torch.cat([order, order[: per * self.world - n]])
            order = order[self.rank :: self.world]
        return order

    def plan(self) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        """This epoch's order (host) and its batches as (start, end, padded length):
        longest first within each window of `window` batches; batch order drawn anew
        each epoch when shuffling."""
        order = self._order()
        span = self.window * self.batch_size
        parts = []
        for s in range(0, len(order), span):
            part = order[s : s + span]
            parts.append(part[torch.sort(-self.lengths_host[part], stable=True).indices])
        order = torch.cat(parts)
        batches = [
            (b * self.batch_size, min((b + 1) * self.batch_size, len(order)))
            for b in range(len(self))
        ]
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 7_919 + self.epoch * 104_729 + 1)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen)]
        lengths = self.lengths_host[order]
        return order, [(s, e, int(lengths[s:e].max())) for s, e in batches]

    def pad(self, index: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
        """The inputs of the sequences at `index` (on the device), padded to `length`."""
        pos = torch.arange(length, device=self.device).unsqueeze(0)
        lens = self.lengths[index].unsqueeze(1)
        rel = pos if self.padding_side == "right" else pos - (length - lens)
        real = (rel >= 0) & (rel < lens)
        where = (self.starts[index].unsqueeze(1) + rel.clamp_min(0)).clamp_max(len(self.ids) - 1)
        ids = torch.where(real, self.ids[where], self.pad_id)
        mask = real.to(torch.int64)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.padding_side == "left":
            inputs["position_ids"] = (mask.cumsum(1) - 1).clamp_min(0)
        return inputs

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], object]]:
        order, batches = self.plan()
        order = order.to(self.device)  # one copy per epoch; batches slice it on the device
        for start, end, length in batches:
            index = order[start:end]
            inputs = self.pad(index, length)
            if self.next_token is not None:
                labels = self.next_token.labels(inputs["input_ids"], inputs["attention_mask"])
            elif not self.labels:
                labels = None
            else:
                views = {v: y[index] for v, y in self.labels.items()}
                labels = views if len(views) > 1 else next(iter(views.values()))
            yield inputs, labels


__all__ = [
    "FORMATS",
    "NextTokenClasses",
    "TextBatches",
    "TextData",
    "checked_rows",
    "class_labels",
    "class_names",
    "cls_id_of",
    "count_next_tokens",
    "dataset_text",
    "encode",
    "from_texts",
    "load_split",
    "load_text",
    "load_tokenizer",
    "pad_id_of",
    "vocab_size_of",
]
