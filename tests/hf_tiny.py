"""Tiny Hugging Face models and a word-level tokenizer built here: nothing is downloaded.

Imported by the tests/test_hf_*.py modules (pytest puts tests/ on the path); every
function imports transformers/tokenizers itself, so collecting the other tests does not.
"""

from __future__ import annotations

import torch

HIDDEN, HEADS, FFN, VOCAB = 32, 2, 64, 120

TEXT = (
    "the cat sat on the mat . the dog sat on the log . a cat and a dog ran to the mat . "
    "the mat was red and the log was brown . a bird sat on the cat . the dog ran ."
)


def tiny_config(family: str, layers: int = 3, vocab: int = VOCAB, num_labels: int = 3):
    import transformers as T

    text = dict(
        hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
        intermediate_size=FFN, vocab_size=vocab, num_labels=num_labels,
    )  # fmt: skip
    image = dict(text, image_size=16, patch_size=4, num_channels=3)
    image.pop("vocab_size")
    decoder = dict(text, num_key_value_heads=1, max_position_embeddings=64)
    configs = {
        "bert": lambda: T.BertConfig(**text),
        "roberta": lambda: T.RobertaConfig(**text),
        "deberta-v2": lambda: T.DebertaV2Config(**text),
        "vit": lambda: T.ViTConfig(**image),
        "deit": lambda: T.DeiTConfig(**image),
        "gpt2": lambda: T.GPT2Config(
            n_embd=HIDDEN,
            n_layer=layers,
            n_head=HEADS,
            n_inner=FFN,
            vocab_size=vocab,
            n_positions=64,
            num_labels=num_labels,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "xlnet": lambda: T.XLNetConfig(
            d_model=HIDDEN,
            n_layer=layers,
            n_head=HEADS,
            d_inner=FFN,
            vocab_size=vocab,
            num_labels=num_labels,
        ),
        "llama": lambda: T.LlamaConfig(**decoder),
        "qwen2": lambda: T.Qwen2Config(**decoder),
    }
    return configs[family]()


def tiny_model(family: str, task: str, layers: int = 3, seed: int = 0, **kw):
    """A randomly initialised model of `family` for `task` (sequence, image, causal_lm)."""
    import transformers as T

    torch.manual_seed(seed)
    config = tiny_config(family, layers, **kw)
    auto = {
        "sequence": T.AutoModelForSequenceClassification,
        "image": T.AutoModelForImageClassification,
        "causal_lm": T.AutoModelForCausalLM,
    }[task]
    if task == "image":  # not every vision family has an Auto mapping in every version
        cls = {"vit": T.ViTForImageClassification, "deit": T.DeiTForImageClassification}
        return cls[family](config).eval()
    return auto.from_config(config).eval()


def word_tokenizer(text: str = TEXT, fast: bool = True):
    """A word-level tokenizer trained on `text` ([PAD]=0, [UNK]=1, [CLS]=2, then words),
    wrapped as a transformers tokenizer when `fast`, else the raw `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]"])
    tok.train_from_iterator([text], trainer)
    if not fast:
        return tok
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def xlnet_tokenizer(text: str = TEXT):
    """XLNet's fast tokenizer around a word-level vocabulary of `text` (<pad>=0, <unk>=1,
    <sep>=2, <cls>=3, then words) that, as XLNet's, appends `<sep> <cls>` to a text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import XLNetTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = ["<pad>", "<unk>", "<sep>", "<cls>"]
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="$A <sep> <cls>", special_tokens=[("<sep>", 2), ("<cls>", 3)]
    )
    return XLNetTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                              sep_token="<sep>", cls_token="<cls>")  # fmt: skip


def padded(sequences: list[list[int]], side: str = "right", pad: int = 0):
    """(input_ids, attention_mask) of `sequences` padded by hand."""
    t = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), t), pad, dtype=torch.int64)
    mask = torch.zeros(len(sequences), t, dtype=torch.int64)
    for i, s in enumerate(sequences):
        sl = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


def positions_by_hand(model, blocks, sequences, tokens: list[int]):
    """The reference for next-token measurements: every block's hidden state at every
    position, one sequence at a time through forward hooks (no padding, no batching), and
    each position's class, the index of its next token in `tokens` (-1: not a class, and
    every sequence's last position). Returns (per block N x D, N labels)."""
    feats: list[list[torch.Tensor]] = [[] for _ in blocks]
    hooks = [b.module.register_forward_hook(
        lambda m, a, o, i=i: feats[i].append(o[0] if isinstance(o, tuple) else o))
        for i, b in enumerate(blocks)]  # fmt: skip
    labels: list[int] = []
    try:
        with torch.no_grad():
            for ids in sequences:
                model(input_ids=torch.tensor([ids]))
                labels += [tokens.index(t) if t in tokens else -1 for t in ids[1:]] + [-1]
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat([f[0] for f in block]) for block in feats], torch.tensor(labels)
