"""The jobs on Hugging Face models, end to end through the command line: a tiny BERT
classifier fine-tuned on planted class words, a tiny LLaMA language model trained from
a config folder, then analyze (next-token classes too), probe, prune with every
criterion, equality; checked against forwards of one sequence at a time."""

from __future__ import annotations

import collections
import json
import math
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from hf_tiny import TEXT, positions_by_hand, tiny_config, tiny_model, word_tokenizer
from nclayers import metrics
from nclayers.cli import main
from nclayers.config import load_config
from nclayers.jobs import RunFolder
from nclayers.jobs.folder import CHECKPOINT
from nclayers.jobs.train import train_job
from nclayers.models import build_model, find_blocks
from nclayers.train import load_checkpoint, step_lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = TEXT.split()
CLASS_WORDS = {"red": ["cat", "mat"], "blue": ["dog", "log"], "green": ["bird", "ran"]}


def lm_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def class_texts(n: int, seed: int) -> list[dict]:
    """Filler words and one planted word of the text's class (a bag-of-words task)."""
    rng = random.Random(seed)
    fillers = [w for w in WORDS if not any(w in ws for ws in CLASS_WORDS.values())]
    rows = []
    for i in range(n):
        label = list(CLASS_WORDS)[i % 3]
        words = [rng.choice(fillers) for _ in range(rng.randint(3, 7))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(CLASS_WORDS[label]))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Model folders (a BERT with weights, a LLaMA config only) with their tokenizer, and
    data: the classifier's as CSV, the language model's as JSON lines."""
    root = tmp_path_factory.mktemp("hfjobs")
    tok = word_tokenizer()
    bert = tiny_model("bert", "sequence", layers=3, vocab=len(tok), num_labels=3)
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    config = tiny_config("llama", layers=4, vocab=len(tok))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    import csv

    (root / "cls").mkdir()
    for split, n, seed in (("train", 90, 0), ("test", 45, 1)):
        with open(root / "cls" / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["text", "label"])
            writer.writeheader()
            writer.writerows(class_texts(n, seed))
        write_jsonl(root / "lm" / f"{split}.jsonl", [{"text": t} for t in lm_texts(n, seed)])
    return root


def lm_args(ws, *extra) -> list[str]:
    return [f"model.name=hf:{ws / 'llama'}", f"data.name=hf:{ws / 'lm'}", "train.epochs=2",
            "train.batch_size=16", "train.optimizer=adamw", "train.lr=0.01",
            "train.schedule=cosine", "train.min_lr=0", "train.warmup_steps=3",
            "train.tensorboard=false", "train.checkpoint_every=0", "analyze.task=next_token",
            "analyze.top_k=6", "analyze.batch_size=16", "device=cpu", *extra]  # fmt: skip


def cls_args(ws, *extra) -> list[str]:
    return [f"model.name=hf:{ws / 'bert'}", f"data.name=hf:{ws / 'cls'}", "train.epochs=4",
            "train.batch_size=15", "train.optimizer=adamw", "train.lr=0.01",
            "train.schedule=linear", "train.min_lr=0", "train.warmup_steps=4",
            "train.tensorboard=false", "train.checkpoint_every=0", "analyze.batch_size=20",
            "device=cpu", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def lm_run(workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmrun") / "run"
    assert main(["train", *lm_args(workspace), "--out", str(out), "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def cls_run(workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("clsrun") / "run"
    assert main(["train", *cls_args(workspace), "--out", str(out), "-q"]) == 0
    return out


def trained(run, family: str):
    """The run's model, from its checkpoint, built independently of the jobs."""
    import transformers as T

    ws_config = RunFolder(run).config()
    path = ws_config.model.name[3:]
    auto = T.AutoModelForCausalLM if family == "llama" else T.AutoModelForSequenceClassification
    model = auto.from_config(T.AutoConfig.from_pretrained(path)).eval()
    model.load_state_dict(load_checkpoint(run / CHECKPOINT)["model"])
    return model, T.AutoTokenizer.from_pretrained(path)


def read_texts(path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- train
@torch.no_grad()
def test_language_model_trains_and_its_perplexity_is_the_hand_one(workspace, lm_run):
    summary = json.loads((lm_run / "train_summary.json").read_text())
    history = summary["history"]
    assert [h["epoch"] for h in history] == [1, 2] and summary["train_labels"] == "next token"
    assert history[1]["train_loss"] < history[0]["train_loss"]
    # By hand: every test text alone (no padding), the next-token loss of every position.
    model, tok = trained(lm_run, "llama")
    nll, count, hits = 0.0, 0, 0
    for text in read_texts(workspace / "lm" / "test.jsonl"):
        ids = tok(text)["input_ids"]
        logp = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
        nll -= sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1))
        hits += sum(int(logp[t].argmax()) == ids[t + 1] for t in range(len(ids) - 1))
        count += len(ids) - 1
    final = history[-1]
    assert final["test_loss"] == pytest.approx(nll / count, rel=1e-5)
    assert final["test_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert final["test_acc"] == pytest.approx(hits / count)
    assert "test perplexity" not in (lm_run / "train.log").read_text()  # the log says "ppl"
    assert "ppl" in (lm_run / "train.log").read_text()


@torch.no_grad()
def test_classifier_fine_tunes_and_its_accuracy_is_the_hand_one(workspace, cls_run):
    import csv

    final = json.loads((cls_run / "train_summary.json").read_text())["final"]
    model, tok = trained(cls_run, "bert")
    rows = list(csv.DictReader(open(workspace / "cls" / "test.csv")))
    classes = sorted(CLASS_WORDS)  # names are numbered in sorted order
    right = sum(
        int(model(**tok(r["text"], return_tensors="pt")).logits.argmax()) == classes.index(
            r["label"]) for r in rows
    )  # fmt: skip
    assert final["test_acc"] == pytest.approx(right / len(rows))
    assert final["test_acc"] > 0.45  # above chance (1/3): one planted word per text
    # Fine-tuned from the folder's weights: the embeddings moved away from them.
    saved = build_model(f"hf:{workspace / 'bert'}", 3)
    emb = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(saved.state_dict()[emb], model.state_dict()[emb])


def test_per_step_warm_up_and_decay():
    tc = load_config(None, ["train.epochs=2", "train.lr=0.1", "train.warmup_steps=4",
                            "train.schedule=linear", "train.min_lr=0"]).train  # fmt: skip
    # 5 steps an epoch: warm-up 1/4 .. 4/4 over steps 0-3, then linear to 0 over 10 - 4 steps.
    got = [step_lr_factor(tc, s, 5) for s in range(10)]
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    cos = tc.model_copy(update={"schedule": "cosine"})
    assert step_lr_factor(cos, 7, 5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    with pytest.raises(ValueError, match="choose one warm-up"):
        load_config(None, ["train.warmup_steps=3", "train.warmup_epochs=1", "train.epochs=5"])


def test_resume_of_hf_training_is_exact(workspace, tmp_path):
    """Dropout (BERT's) and a per-step warm-up that crosses the interruption: the resumed
    run's weights equal an uninterrupted run's, bit for bit."""
    cfg = load_config(None, cls_args(workspace, "train.epochs=2", "train.warmup_steps=8"))
    full = train_job(cfg, tmp_path / "full", progress=False)
    train_job(cfg, tmp_path / "cut", progress=False, stop_after=1)
    resumed = train_job(cfg, tmp_path / "cut", progress=False, resume=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full.summary["history"][-1]["lr"] == resumed.summary["history"][-1]["lr"]


# ----------------------------------------------------------------------------- measure
@torch.no_grad()
def test_next_token_analysis_of_the_run_equals_hand_statistics(workspace, lm_run, capsys):
    assert main(["analyze", str(lm_run), "-q"]) == 0
    table = RunFolder(lm_run).layers()
    test = sorted(table.where(split="test"), key=lambda r: r["layer"])
    assert [r["layer"] for r in test] == [1, 2, 3, 4] and {r["view"] for r in test} == {"clean"}
    # The classes: the 6 most frequent next tokens of the *training* text, ties by id.
    model, tok = trained(lm_run, "llama")
    counts = collections.Counter()
    for text in read_texts(workspace / "lm" / "train.jsonl"):
        counts.update(tok(text)["input_ids"][1:])
    top = sorted(counts, key=lambda t: (-counts[t], t))[:6]
    sequences = [tok(text)["input_ids"] for text in read_texts(workspace / "lm" / "test.jsonl")]
    feats, y = positions_by_hand(model, find_blocks(model), sequences, top)
    keep = y >= 0
    assert all(r["n"] == int(keep.sum()) for r in test)
    for layer, row in enumerate(test):
        x = feats[layer][keep].double()
        assert row["nc1"] == pytest.approx(metrics.nc1(x, y[keep], 6), rel=1e-4)
        assert row["nc2"] == pytest.approx(metrics.nc2(x, y[keep], 6), rel=1e-4, abs=1e-6)
    summary = json.loads((lm_run / "summary.json").read_text())["analyze"]
    assert summary["task"] == "next_token" and summary["next_token_classes"] == top


def test_probe_prune_and_equality_on_the_language_model(lm_run, capsys):
    assert main(["probe", str(lm_run), "probe.epochs=2", "probe.batch_size=64", "-q"]) == 0
    probe = json.loads((lm_run / "summary.json").read_text())["probe"]
    n = RunFolder(lm_run).layers().where(split="test")[0]["n"]
    assert probe["test_samples"] == n and probe["mode"] == "cache"  # positions kept
    assert all(0 <= r["probe_acc"] <= 1 for r in RunFolder(lm_run).layers().where(split="test"))
    rc = main(["prune", str(lm_run), "prune.n=2", "prune.seeds=[0]", "-q"])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    table = RunFolder(lm_run).read_table("prune.csv")
    assert [r["kind"] for r in table] == ["none", "plateau", "block_influence", "angular",
                                          "last", "random"]  # fmt: skip
    assert all(r["n_removed"] == (0 if r["kind"] == "none" else 2) for r in table)
    scores = RunFolder(lm_run).read_table("layer_scores.csv")
    bi = sorted(range(1, 5), key=lambda l: (scores[l - 1]["block_influence"], l))[:2]
    assert table[2]["layers"] == " ".join(map(str, sorted(bi)))
    ang = [r["angular"] for r in scores][:3]  # d(l, 2) for l = 1..3
    start = min(range(1, 4), key=lambda l: (ang[l - 1], l))
    assert table[3]["layers"] == f"{start} {start + 1}" and table[4]["layers"] == "3 4"
    # The unpruned model's held-out perplexity is the one training measured.
    final = json.loads((lm_run / "train_summary.json").read_text())["final"]
    assert table[0]["perplexity"] == pytest.approx(final["test_perplexity"], rel=1e-5)
    assert "perplexity without fine-tune" in out
    assert main(["equality", str(lm_run), "--no-plot"]) == 0
    assert json.loads((lm_run / "equality.json").read_text())[0]["blocks"] == 4


def test_classifier_analyze_probe_prune_with_fine_tune_and_equality(cls_run, capsys):
    assert main(["analyze", str(cls_run), "model.pool=cls", "-q"]) == 0
    test = RunFolder(cls_run).layers().where(split="test")
    assert len(test) == 3 and all(r["n"] == 45 for r in test)
    assert main(["probe", str(cls_run), "probe.epochs=2", "model.pool=cls", "-q"]) == 0
    assert json.loads((cls_run / "summary.json").read_text())["probe"]["mode"] == "cache"
    rc = main(["prune", str(cls_run), "prune.n=1", "prune.seeds=[0]", "model.pool=cls",
               "prune.finetune_epochs=1", "prune.finetune_lr=0.001", "-q"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    table = RunFolder(cls_run).read_table("prune.csv")
    assert {(r["kind"], r["finetune_epochs"]) for r in table} == {
        (k, e) for k in ("none", "plateau", "block_influence", "angular", "last", "random")
        for e in (0, 1)
    }  # fmt: skip
    assert "perplexity" not in table.columns
    none = [r for r in table if r["kind"] == "none"]
    final = json.loads((cls_run / "train_summary.json").read_text())["final"]
    assert none[0]["test_acc"] == pytest.approx(final["test_acc"])
    assert main(["equality", str(cls_run), "--no-plot"]) == 0
    # model.pool steers the measurement, not the run: the folder is still this run.
    assert RunFolder(cls_run).done("analyze", RunFolder(cls_run).config(["model.pool=cls"]))


def test_language_text_needs_next_token_classes(lm_run, capsys):
    assert main(["analyze", str(lm_run), "analyze.task=classify", "-q"]) == 2
    assert "analyze.task=next_token" in capsys.readouterr().err
    assert main(["prune", str(lm_run), "analyze.task=classify", "prune.n=1", "-q"]) == 2
    assert "analyze.task=next_token" in capsys.readouterr().err


def test_blocks_of_a_hub_style_folder(workspace, capsys):
    assert main(["blocks", f"hf:{workspace / 'llama'}"]) == 0  # a config-only folder
    out = capsys.readouterr().out
    assert "4 blocks on a sequence of 8 tokens" in out and "model.layers.3" in out
    assert main(["blocks", f"hf:{workspace / 'bert'}"]) == 0
    assert "bert.encoder.layer.2" in capsys.readouterr().out


def test_label_noise_and_memorization_on_a_text_classifier(workspace, tmp_path, capsys):
    out = tmp_path / "noisy"
    args = cls_args(workspace, "data.noise=0.4", "train.epochs=1")
    assert main(["train", *args, "--out", str(out), "-q"]) == 0
    noise = json.loads((out / "train_summary.json").read_text())["label_noise"]
    assert noise["changed"] > 0 and noise["rate"] == pytest.approx(noise["changed"] / 90)
    assert 0 <= noise["memorized"] <= 1
    assert main(["memorization", str(out), "-q"]) == 0
    ratios = RunFolder(out).read_table("memorization.csv")
    assert [r["layer"] for r in ratios] == [1, 2, 3]
    assert f"changed labels: {noise['changed']} of 90" in capsys.readouterr().out


def test_next_token_measures_refuse_a_bidirectional_encoder(workspace, tmp_path, capsys):
    """A BERT classifier sees the token after every position: analyze and probe on
    next-token classes refuse it in one line (and -q shows no weight-loading bars)."""
    args = [f"model.name=hf:{workspace / 'bert'}", f"data.name=hf:{workspace / 'lm'}",
            "analyze.task=next_token", "analyze.top_k=6", "device=cpu"]  # fmt: skip
    for verb in ("analyze", "probe"):
        capsys.readouterr()
        assert main([verb, *args, "--out", str(tmp_path / verb), "-q"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert "is not a causal language model" in err and "analyze.task=classify" in err
        assert "Loading" not in err and "%|" not in err


def test_a_next_token_class_the_test_split_lacks_is_named(workspace, tmp_path, capsys):
    """The top_k classes are counted on the training split; a class that never occurs as a
    next token in the test split is named by its token, with the settings that help."""
    data = tmp_path / "lm"
    write_jsonl(data / "train.jsonl", [{"text": "the cat sat on the mat"}] * 5
                + [{"text": "a bird ran"}] * 3)  # fmt: skip
    write_jsonl(data / "test.jsonl", [{"text": "the cat sat on the mat"}] * 4)
    args = [f"model.name=hf:{workspace / 'llama'}", f"data.name=hf:{data}", "device=cpu",
            "model.untrained=true", "model.options.init=config", "analyze.task=next_token",
            "analyze.top_k=7"]  # fmt: skip
    capsys.readouterr()
    assert main(["analyze", *args, "--out", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "token 'ran'" in err and "lower analyze.top_k (to 5 or less)" in err
    assert "analyze.reference=test" in err and "num_classes" not in err
    assert main(["analyze", *args[:-1], "analyze.top_k=5", "--out", str(tmp_path / "ok"),
                 "-q"]) == 0  # fmt: skip
