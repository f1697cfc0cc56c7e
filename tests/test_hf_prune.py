"""Which transformer layers can go: pass-through pruning against smaller models built
with the kept layers' weights, Block Influence and angular distance against per-sequence
hand computations, perplexity by hand, the choices of each criterion."""

from __future__ import annotations

import math
import re

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import padded, tiny_config, tiny_model, word_tokenizer
from nclayers.data.text import NextTokenClasses, TextBatches, count_next_tokens, from_texts
from nclayers.layer_scores import choose_layers, layer_scores, plateau_order
from nclayers.lm import lm_loss, perplexity
from nclayers.models import find_blocks
from nclayers.prune import PassThrough, prune_experiment, prune_model
from nclayers.report.prune_figures import plot_prune

pytestmark = pytest.mark.usefixtures("one_thread")

# family, task, the prefix of its layers in the state dict
FAMILIES = [
    ("llama", "causal_lm", "model.layers"),
    ("gpt2", "causal_lm", "transformer.h"),
    ("bert", "sequence", "bert.encoder.layer"),
    ("deberta-v2", "sequence", "deberta.encoder.layer"),
]


def smaller_twin(model, family: str, task: str, prefix: str, keep: list[int]):
    """A model of `len(keep)` layers holding the kept layers' weights (0-based `keep`)."""
    import transformers as T

    config = tiny_config(family, layers=len(keep), vocab=model.config.vocab_size)
    auto = T.AutoModelForCausalLM if task == "causal_lm" else T.AutoModelForSequenceClassification
    twin = auto.from_config(config).eval()
    state = {}
    for key, value in model.state_dict().items():
        m = re.match(rf"{re.escape(prefix)}\.(\d+)\.(.*)", key)
        if m is None:
            state[key] = value
        elif int(m.group(1)) in keep:
            state[f"{prefix}.{keep.index(int(m.group(1)))}.{m.group(2)}"] = value
    twin.load_state_dict(state)
    return twin


@torch.no_grad()
@pytest.mark.parametrize(("family", "task", "prefix"), FAMILIES)
def test_pruned_model_equals_the_model_without_those_layers(family, task, prefix):
    model = tiny_model(family, task, layers=4, vocab=50)
    blocks = find_blocks(model)
    pruned = prune_model(model, [blocks[1].name, blocks[2].name])
    assert isinstance(pruned.get_submodule(blocks[1].name), PassThrough)
    twin = smaller_twin(model, family, task, prefix, keep=[0, 3])
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 50, (k,), generator=gen).tolist() for k in (7, 4, 6)]
    ids, mask = padded(seqs)
    got = pruned(input_ids=ids, attention_mask=mask).logits
    want = twin(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The original still computes what it did: its four layers.
    assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, got)


def test_pass_through_returns_what_the_parent_expects():
    deberta = tiny_model("deberta-v2", "sequence", layers=2)
    name = find_blocks(deberta)[0].name
    stand_in = prune_model(deberta, [name]).get_submodule(name)
    assert stand_in.extras == 1  # DeBERTa-v2 layers return (hidden, attention)
    x = torch.randn(1, 3, 32)
    out = stand_in(x, torch.ones(1, 1, 3, 3), query_states=None)
    assert out[0] is x and out[1] is None
    qwen = tiny_model("qwen2", "causal_lm", layers=2)
    name = find_blocks(qwen)[1].name
    stand_in = prune_model(qwen, [name]).get_submodule(name)
    assert stand_in.extras is None and stand_in(hidden_states=x) is x
    original = qwen.get_submodule(name)
    for attr in ("attention_type", "layer_idx"):
        if hasattr(original, attr):
            assert getattr(stand_in, attr) == getattr(original, attr)


def hand_scores(model, seqs, position: str = "last"):
    """BI and angular distances from each sequence alone (no padding), in float64, from
    hooks of our own on the decoder layers; angles at the last token, or averaged over
    every token (position "mean")."""
    layers = list(model.model.layers)
    ins, outs = {}, {}

    def hook_for(i):
        def hook(_module, args, kwargs, output):
            ins[i] = (args[0] if args else kwargs["hidden_states"])[0]
            outs[i] = (output[0] if isinstance(output, tuple) else output)[0]

        return hook

    hooks = [m.register_forward_hook(hook_for(i), with_kwargs=True) for i, m in enumerate(layers)]
    n = len(layers)
    cos_sum, tokens = [0.0] * n, 0
    ang = [[0.0] * n for _ in range(n)]
    try:
        for s in seqs:
            model(input_ids=torch.tensor([s]))
            tokens += len(s)
            for l in range(n):
                x, y = ins[l].double(), outs[l].double()
                for t in range(len(s)):
                    cos_sum[l] += float(x[t] @ y[t] / (x[t].norm() * y[t].norm()))
                for m in range(l, n):
                    for t in range(len(s)) if position == "mean" else [len(s) - 1]:
                        a, b = ins[l][t].double(), outs[m][t].double()
                        c = float(a @ b / (a.norm() * b.norm()))
                        ang[l][m] += math.acos(max(-1.0, min(1.0, c))) / math.pi
    finally:
        for h in hooks:
            h.remove()
    bi = [1 - c / tokens for c in cos_sum]
    count = tokens if position == "mean" else len(seqs)
    return bi, [[v / count for v in row] for row in ang]


@torch.no_grad()
def test_block_influence_and_angular_distance_equal_hand_computations():
    model = tiny_model("llama", "causal_lm", layers=4, vocab=40)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 40, (k,), generator=gen).tolist() for k in (5, 9, 3, 7, 6)]
    bi, ang = hand_scores(model, seqs)
    for side in ("right", "left"):
        batches = []
        for i in (0, 3):
            ids, mask = padded(seqs[i : i + 3], side)
            inputs = {"input_ids": ids, "attention_mask": mask}
            if side == "left":
                inputs["position_ids"] = (mask.cumsum(1) - 1).clamp_min(0)
            batches.append((inputs, None))
        scores = layer_scores(model, batches)
        assert scores.sequences == 5 and scores.tokens == sum(map(len, seqs))
        assert scores.block_influence == pytest.approx(bi, abs=1e-5)
        for l in range(4):
            for m in range(l, 4):
                assert float(scores.angular[l, m]) == pytest.approx(ang[l][m], abs=1e-4)
        assert scores.angular_distance(2) == pytest.approx(
            [ang[l][l + 1] for l in range(3)], abs=1e-4
        )
        assert math.isnan(float(scores.angular[2, 1]))
    table = scores.table(n=2)
    assert [r["angular"] is None for r in table] == [False, False, False, True]
    # position "mean": every real token of every padded sequence, once
    _, ang = hand_scores(model, seqs, "mean")
    scores = layer_scores(model, batches, position="mean")
    for l in range(4):
        for m in range(l, 4):
            assert float(scores.angular[l, m]) == pytest.approx(ang[l][m], abs=1e-4)


def test_choices_of_each_criterion():
    class Scores:  # what choose_layers reads of LayerScores
        blocks = ("b",) * 6
        block_influence = (0.5, 0.1, 0.3, 0.05, 0.2, 0.9)

        @staticmethod
        def angular_distance(n):
            return {2: [0.4, 0.3, 0.1, 0.2, 0.5]}[n]

    assert choose_layers("block_influence", 2, scores=Scores) == [2, 4]
    assert choose_layers("block_influence", 2, scores=Scores, candidates=[1, 2, 3]) == [2, 3]
    assert choose_layers("angular", 2, scores=Scores) == [3, 4]
    assert choose_layers("angular", 2, scores=Scores, candidates=[1, 2, 3, 5, 6]) == [2, 3]
    assert choose_layers("last", 2, layers=6) == [5, 6]
    assert choose_layers("random", 3, layers=6, seed=1) == choose_layers(
        "random", 3, layers=6, seed=1
    )
    # NC1 falls fast, flattens over layers 3-5, falls again: the plateau goes first, its
    # flattest step (the least enhancement) before the others.
    nc1 = [100.0, 50.0, 49.0, 48.9, 48.5, 10.0, 5.0]
    # e_4 < e_5 < e_3 in the plateau; then e_2 = e_7 = log 2 < e_6; layer 1 has none
    assert plateau_order(nc1) == [4, 5, 3, 2, 7, 6, 1]
    assert choose_layers("plateau", 2, nc1=nc1) == [4, 5]
    with pytest.raises(ValueError, match="criterion='angular' needs the layer scores"):
        choose_layers("angular", 2, layers=6)
    with pytest.raises(ValueError, match="criterion='depth'"):
        choose_layers("depth", 2, layers=6)


@torch.no_grad()
def test_perplexity_and_lm_loss_equal_hand_computation():
    model = tiny_model("gpt2", "causal_lm", layers=2, vocab=30)
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, 30, (k,), generator=gen).tolist() for k in (6, 2, 9, 4)]
    nll, count = 0.0, 0
    for s in seqs:
        logp = model(input_ids=torch.tensor([s])).logits[0].double().log_softmax(-1)
        nll -= sum(float(logp[t, s[t + 1]]) for t in range(len(s) - 1))
        count += len(s) - 1
    batches = []
    for i in (0, 2):
        ids, mask = padded(seqs[i : i + 2])
        batches.append(({"input_ids": ids, "attention_mask": mask}, None))
    result = perplexity(model, batches)
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    ids, mask = batches[0][0]["input_ids"], batches[0][0]["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = lm_loss(logits, ids, mask, reduction="none")
    assert loss.shape == (2, ids.shape[1] - 1) and (loss[1, 1:] == 0).all()  # padding
    assert float(lm_loss(logits, ids, mask)) == pytest.approx(float(loss.sum() / 6))


def test_prune_experiment_on_a_language_model(tmp_path):
    text = " ".join(["the cat sat on the mat . a dog ran to the log ."] * 4)
    sentences = [s.strip() + " ." for s in text.split(" . ") if s.strip(" .")]
    tok = word_tokenizer(text)
    data = from_texts(sentences, tok)
    classes = NextTokenClasses.from_counts(count_next_tokens(data), 4)
    batches = TextBatches(data, 4, next_token=classes)
    model = tiny_model("llama", "causal_lm", layers=4, vocab=data.vocab_size)
    blocks = find_blocks(model, pool="token")
    scores = layer_scores(model, batches, blocks)
    criteria = {c: choose_layers(c, 2, scores=scores) for c in ("block_influence", "angular")}
    summary, layers = prune_experiment(
        model, blocks, [2, 3], batches, 4, label="plateau", criteria=criteria, seeds=(0,),
        perplexity=True,
    )  # fmt: skip
    kinds = [r["kind"] for r in summary]
    assert kinds == ["none", "plateau", "block_influence", "angular", "last", "random"]
    none = summary[0]
    assert none["perplexity"] == pytest.approx(perplexity(model, batches)["perplexity"])
    assert all(r["perplexity"] > 1 and r["n_removed"] == (0 if r is none else 2) for r in summary)
    assert len(layers) == 4 * len(summary)
    assert plot_prune(summary, tmp_path / "prune.png", layers).stat().st_size > 0
