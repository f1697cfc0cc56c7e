"""`nclayers demo --text`: every layer of two small transformers, offline, in CPU minutes.

Beside the image demo (`nclayers demo`), with nothing downloaded:

1. a language model: the text is the Python standard library's own sources (chunks of a
   few lines, from files drawn with a seed), the tokenizer a byte-level BPE trained on
   them by `tokenizers`, the model a small LLaMA-layout decoder built from a config and
   trained here (`nclayers train`: AdamW, per-step warm-up, cosine decay). Then token-level
   collapse (`analyze.task=next_token`: a position's class is the token after it, among
   the top_k most frequent next tokens of the training text), linear probes on every
   layer's positions, and which layers can go (`nclayers prune`: prune.n layers removed
   by the NC plateau rule, Block Influence, the angular distance, the last ones and at
   random, judged by held-out perplexity);
2. a text classifier: a generated task whose class shows in planted class words among
   filler words (two of its class, sometimes one of another), a word-level tokenizer and
   a small BERT-layout encoder trained from scratch; then NC1/NC2/NCC per layer (mean over
   the real tokens) and probes.

Everything lands in one folder (default runs/demo-text): lm/ and classifier/ (the run
folders), their inputs (lm-model/, lm-data/, cls-model/, cls-data/), and layers.csv (both
runs), prune.csv and layer_scores.csv (the language model), summary.json, the figures
and report.html. `size` scales the data and the training (tests run it small).
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from nclayers.config import Config, load_config
from nclayers.jobs.analyze import analyze_job
from nclayers.jobs.folder import LAYERS, PRUNE, SUMMARY, RunFolder
from nclayers.jobs.probe import probe_job
from nclayers.jobs.prune import LAYER_SCORES, prune_job
from nclayers.jobs.train import train_job
from nclayers.table import Table

log = logging.getLogger("nclayers.demo")

LM_RUN, CLS_RUN = "lm", "classifier"
CLASSES = {  # the planted words of each class
    "astronomy": ["comet", "nebula", "orbit", "quasar", "telescope"],
    "cooking": ["saucepan", "simmer", "recipe", "oven", "whisk"],
    "music": ["melody", "chord", "violin", "tempo", "chorus"],
    "sailing": ["harbour", "mast", "rudder", "anchor", "starboard"],
}
SYLLABLES = ("ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "ve", "zu", "bar", "dex")


@dataclass(frozen=True)
class TextDemoSize:
    """How big the demo is: sequences per split, training epochs, model widths."""

    lm_train: int = 2400
    lm_test: int = 300
    lm_layers: int = 6
    lm_hidden: int = 64
    lm_vocab: int = 512
    lm_epochs: int = 6
    max_length: int = 32
    top_k: int = 64
    cls_train: int = 1600
    cls_test: int = 400
    cls_layers: int = 4
    cls_epochs: int = 3
    probe_epochs: int = 4
    prune_n: int = 2


TINY = TextDemoSize(lm_train=120, lm_test=40, lm_layers=3, lm_hidden=32, lm_vocab=300,
                    lm_epochs=1, max_length=24, top_k=12, cls_train=80, cls_test=40,
                    cls_layers=2, cls_epochs=2, probe_epochs=2, prune_n=1)  # fmt: skip


# ----------------------------------------------------------------------------- inputs
def stdlib_texts(count: int, seed: int = 0, max_lines: int = 6) -> list[str]:
    """`count` chunks of 1..max_lines consecutive non-blank lines (dedented) of the Python
    standard library's modules, from files drawn with `seed`."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    rng = random.Random(seed)
    rng.shuffle(files)
    texts: list[str] = []
    for path in files:
        lines = [ln.rstrip() for ln in path.read_text(errors="ignore").splitlines() if ln.strip()]
        i = 0
        while i < len(lines) and len(texts) < count:
            k = rng.randint(1, max_lines)
            texts.append(textwrap.dedent("\n".join(lines[i : i + k])))
            i += k + rng.randint(0, 20)  # skip a little: chunks from all over the file
        if len(texts) >= count:
            break
    return texts


def planted_texts(count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(texts, labels): filler pseudo-words with two planted words of the text's class and,
    in a third of them, one word of another class."""
    rng = random.Random(seed)
    names = list(CLASSES)
    fillers = [a + b for a in SYLLABLES for b in SYLLABLES]
    texts, labels = [], []
    for i in range(count):
        label = names[i % len(names)]
        words = [rng.choice(fillers) for _ in range(rng.randint(6, 14))]
        planted = rng.sample(CLASSES[label], 2)
        if rng.random() < 1 / 3:
            other = rng.choice([n for n in names if n != label])
            planted.append(rng.choice(CLASSES[other]))
        for word in planted:
            words.insert(rng.randrange(len(words) + 1), word)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def bpe_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE trained on `texts` (<pad>, <eos>), as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def word_tokenizer(texts: list[str]):
    """A word-level tokenizer of `texts` that puts [CLS] first (BERT's pooler reads it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "[CLS]"], show_progress=False))  # fmt: skip
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A", special_tokens=[("[CLS]", tok.token_to_id("[CLS]"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]")  # fmt: skip


def write_model(folder: RunFolder, config, tokenizer) -> None:
    """A model folder holding a config.json (no weights: trained from scratch) and the
    tokenizer's files, each written atomically and recorded by `folder`."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        config.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            folder.write(path.name, path.read_bytes())


def write_split(folder: RunFolder, split: str, rows: list[dict]) -> None:
    folder.write(f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _lm_inputs(out: Path, size: TextDemoSize) -> None:
    import transformers as T

    texts = stdlib_texts(size.lm_train + size.lm_test)
    if len(texts) < size.lm_train + size.lm_test:
        raise RuntimeError(f"the standard library gave {len(texts)} chunks")  # a bug here
    train, test = texts[: size.lm_train], texts[size.lm_train :]
    tokenizer = bpe_tokenizer(train, size.lm_vocab)
    config = T.LlamaConfig(
        hidden_size=size.lm_hidden, num_hidden_layers=size.lm_layers, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=size.lm_hidden * 8 // 3 // 8 * 8,
        vocab_size=len(tokenizer), max_position_embeddings=size.max_length,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    write_model(RunFolder(out / "lm-model"), config, tokenizer)
    data = RunFolder(out / "lm-data")
    write_split(data, "train", [{"text": t} for t in train])
    write_split(data, "test", [{"text": t} for t in test])


def _classifier_inputs(out: Path, size: TextDemoSize) -> None:
    import transformers as T

    texts, labels = planted_texts(size.cls_train + size.cls_test)
    tokenizer = word_tokenizer(texts[: size.cls_train])
    config = T.BertConfig(
        hidden_size=64, num_hidden_layers=size.cls_layers, num_attention_heads=4,
        intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=64,
        num_labels=len(CLASSES), pad_token_id=tokenizer.pad_token_id,
        architectures=["BertForSequenceClassification"],
    )  # fmt: skip
    write_model(RunFolder(out / "cls-model"), config, tokenizer)
    rows = [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)]
    data = RunFolder(out / "cls-data")
    write_split(data, "train", rows[: size.cls_train])
    write_split(data, "test", rows[size.cls_train :])


# ----------------------------------------------------------------------------- configs
def lm_config(out: Path, size: TextDemoSize, overrides=()) -> Config:
    """The language model's run: trained from its config folder, measured per position."""
    root = out.resolve()
    return load_config(None, [
        f"model.name=hf:{root / 'lm-model'}", f"data.name=hf:{root / 'lm-data'}",
        f"data.max_length={size.max_length}", f"train.epochs={size.lm_epochs}",
        # Small batches: a model this small learns per step (900 steps in about a minute).
        "train.batch_size=16", "train.optimizer=adamw", "train.lr=0.01",
        "train.weight_decay=0.01", "train.schedule=cosine", "train.min_lr=0.0001",
        "train.warmup_steps=50", "train.checkpoint_every=0", "train.tensorboard=false",
        "analyze.task=next_token", f"analyze.top_k={size.top_k}", "analyze.batch_size=64",
        f"probe.epochs={size.probe_epochs}", "probe.milestones=[3]", "probe.augment=false",
        "probe.standardize=true", "probe.batch_size=512", "probe.eval_batch_size=64",
        f"prune.n={size.prune_n}", "prune.seeds=[0, 1, 2]", "device=cpu", f"run={LM_RUN}",
        *overrides,
    ])  # fmt: skip


def classifier_config(out: Path, size: TextDemoSize, overrides=()) -> Config:
    """The classifier's run: trained from scratch, measured on the mean of real tokens."""
    root = out.resolve()
    return load_config(None, [
        f"model.name=hf:{root / 'cls-model'}", f"data.name=hf:{root / 'cls-data'}",
        "data.max_length=32", f"train.epochs={size.cls_epochs}", "train.batch_size=32",
        "train.optimizer=adamw", "train.lr=0.002", "train.weight_decay=0.01",
        "train.schedule=linear", "train.min_lr=0", "train.warmup_steps=10",
        "train.checkpoint_every=0", "train.tensorboard=false", "analyze.batch_size=128",
        f"probe.epochs={size.probe_epochs}", "probe.milestones=[3]", "probe.augment=false",
        "probe.standardize=true", "probe.eval_batch_size=128", "device=cpu",
        f"run={CLS_RUN}", *overrides,
    ])  # fmt: skip


# ----------------------------------------------------------------------------- the demo
def run_text_demo(
    out: str | Path = "runs/demo-text",
    overrides: list[str] | tuple = (),
    progress: bool = True,
    size: TextDemoSize | None = None,
) -> dict:
    """Build the inputs, train and measure both models, write the report (module doc).
    Returns the summary (also in summary.json) with `text`, the story for the terminal."""
    import torch

    threads = torch.get_num_threads()
    # Models this small gain nothing from a second thread, and on shared cores a second
    # thread spinning for its turn cost 10-20x the CPU time of one (measured, load 10 on 2
    # cores): one thread, then the caller's setting again.
    torch.set_num_threads(1)
    try:
        return _run(Path(out), overrides, progress, size or TextDemoSize())
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, overrides, progress: bool, size: TextDemoSize) -> dict:
    folder = RunFolder(out)
    t0, cpu0 = time.perf_counter(), time.process_time()
    _lm_inputs(out, size)
    _classifier_inputs(out, size)
    seconds = {"inputs": time.perf_counter() - t0}
    lm = _language_model(out, size, overrides, progress, seconds)
    cls = _classifier(out, size, overrides, progress, seconds)
    layers = Table([*lm["layers"], *cls["layers"]])
    folder.write_table(LAYERS, layers)
    folder.write_table(PRUNE, lm["prune"].summary)
    if lm["prune"].scores is not None:
        folder.write_table(LAYER_SCORES, lm["prune"].scores)
    summary = {
        "size": size.__dict__, "language_model": lm["summary"], "classifier": cls["summary"],
        "prune_notes": lm["prune"].notes, "seconds": seconds,
    }  # fmt: skip
    from nclayers.jobs.text_report import draw_figures, story, write_text_report

    figures = draw_figures(folder, layers, lm["prune"])
    seconds["total"] = time.perf_counter() - t0
    summary["cpu_seconds"] = time.process_time() - cpu0  # every thread of this process
    folder.write_json(SUMMARY, summary)
    write_text_report(folder, layers, lm["prune"], summary, figures)
    summary["text"] = story(layers, lm["prune"], summary, out)
    return summary


def _language_model(out: Path, size, overrides, progress: bool, seconds: dict) -> dict:
    cfg = lm_config(out, size, overrides)
    run = RunFolder(out / LM_RUN)
    t = time.perf_counter()
    log.info("[%s] training a %d-layer decoder on %d chunks of the standard library",
             LM_RUN, size.lm_layers, size.lm_train)  # fmt: skip
    trained = train_job(cfg, run, progress=progress, force=True)
    seconds["lm_train"] = time.perf_counter() - t
    log.info("[%s] token-level collapse of every layer (top %d next tokens)", LM_RUN, size.top_k)
    t = time.perf_counter()
    measured = analyze_job(cfg, run, model=trained.model, progress=progress)
    probe_job(cfg, run, model=trained.model, progress=progress)
    seconds["lm_measure"] = time.perf_counter() - t
    log.info("[%s] which %d layers can go, chosen each way", LM_RUN, size.prune_n)
    t = time.perf_counter()
    pruned = prune_job(cfg, run, progress=progress)
    seconds["lm_prune"] = time.perf_counter() - t
    final = trained.summary["final"]
    return {
        "layers": run.layers(), "prune": pruned,
        "summary": {"test_perplexity": final["test_perplexity"],
                    "next_token_accuracy": measured.summary["accuracy"]["test"]["clean"],
                    "epochs": final["epoch"], "train_loss": final["train_loss"]},
    }  # fmt: skip


def _classifier(out: Path, size, overrides, progress: bool, seconds: dict) -> dict:
    cfg = classifier_config(out, size, overrides)
    run = RunFolder(out / CLS_RUN)
    t = time.perf_counter()
    log.info("[%s] training a %d-layer encoder on planted class words", CLS_RUN, size.cls_layers)
    trained = train_job(cfg, run, progress=progress, force=True)
    seconds["classifier_train"] = time.perf_counter() - t
    t = time.perf_counter()
    analyze_job(cfg, run, model=trained.model, progress=progress)
    probe_job(cfg, run, model=trained.model, progress=progress)
    seconds["classifier_measure"] = time.perf_counter() - t
    final = trained.summary["final"]
    return {"layers": run.layers(),
            "summary": {"test_acc": final["test_acc"], "epochs": final["epoch"]}}  # fmt: skip


__all__ = ["TINY", "TextDemoSize", "run_text_demo", "stdlib_texts"]
