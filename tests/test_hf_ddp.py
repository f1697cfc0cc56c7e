"""Training a Hugging Face language model under two processes (gloo on CPU), as torchrun
would start them: DDP keeps the ranks identical, rank 0 writes, losses are reduced."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from nclayers.config import load_config
from nclayers.jobs.folder import CHECKPOINT
from nclayers.train import load_checkpoint
from ports import free_port

WORLD = 2
pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo"
)


def settings(tmp: Path) -> list[str]:
    return [f"model.name=hf:{tmp / 'llama'}", f"data.name=hf:{tmp / 'lm'}", "train.epochs=2",
            "train.batch_size=8", "train.optimizer=adamw", "train.lr=0.01",
            "train.warmup_steps=2", "train.schedule=linear", "train.min_lr=0",
            "train.tensorboard=false", "device=cpu"]  # fmt: skip


def worker(rank: int, tmp: Path, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    from nclayers.jobs.train import train_job

    result = train_job(load_config(None, settings(tmp)), tmp / "run", progress=False)
    torch.save(result.model.state_dict(), tmp / f"rank{rank}.pt")
    history = [{k: v for k, v in h.items() if k not in ("img_per_s", "epoch_seconds", "seconds")}
               for h in result.summary["history"]]  # fmt: skip
    (tmp / f"rank{rank}.json").write_text(json.dumps(history))


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    from hf_tiny import TEXT, tiny_config, word_tokenizer

    tmp = tmp_path_factory.mktemp("hfddp")
    tok = word_tokenizer()
    config = tiny_config("llama", layers=2, vocab=len(tok))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp / "llama")
    tok.save_pretrained(tmp / "llama")
    words = TEXT.split()
    (tmp / "lm").mkdir()
    for split, n in (("train", 21), ("test", 9)):  # 21: the last shard is padded by wrapping
        rows = [{"text": " ".join(words[i : i + 3 + i % 5])} for i in range(n)]
        (tmp / "lm" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mp.spawn(worker, args=(tmp, free_port()), nprocs=WORLD, join=True)
    return tmp


def test_ddp_language_model_ranks_agree_and_rank0_writes(spawned):
    weights = [torch.load(spawned / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), f"{key} differs between ranks"
    checkpoint = load_checkpoint(spawned / "run" / CHECKPOINT)
    assert checkpoint["world"] == WORLD and len(checkpoint["rng"]) == WORLD
    for key, value in checkpoint["model"].items():
        assert torch.equal(value, weights[0][key])
    histories = [json.loads((spawned / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert histories[0] == histories[1] and len(histories[0]) == 2
    assert all(h["test_perplexity"] > 1 for h in histories[0])
    log = (spawned / "run" / "train.log").read_text()
    assert "2 process(es), per-process batch 4" in log
    assert sum(line.startswith("epoch") for line in log.splitlines()) == 2
