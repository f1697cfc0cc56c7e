"""Causal language-model losses: the next-token cross-entropy and perplexity.

Position t of a sequence predicts token t+1; a pair counts only where both positions are
real tokens (attention mask 1), so padding on either side and each sequence's last
position never count. Sums stay on the device until the end (no host synchronisation
per batch) and are summed over torch.distributed ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from nclayers.errors import NCLayersError
from nclayers.runtime import all_sum, autocast
from nclayers.runtime import progress as progress_bar
from nclayers.taps import output_logits, run_model, to_device

IGNORE = -100  # the target of a position that predicts nothing


def next_token_targets(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """N x (T-1) targets: the next token where it and the position are real, else -100."""
    target = input_ids[:, 1:]
    if attention_mask is None:
        return target
    keep = (attention_mask[:, :-1] != 0) & (attention_mask[:, 1:] != 0)
    return target.masked_fill(~keep, IGNORE)


def lm_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of N x T x V `logits` (float32 accumulation): the mean
    over counted positions ("mean"), their sum ("sum"), or N x (T-1) ("none", 0 where a
    position does not count). `target`: `next_token_targets(input_ids, attention_mask)`
    when the caller has it already."""
    if logits.ndim != 3 or logits.shape[:2] != input_ids.shape:
        raise NCLayersError(
            f"logits: expected N x T x V for input_ids {tuple(input_ids.shape)}, got "
            f"{tuple(logits.shape)}"
        )
    if reduction not in ("mean", "sum", "none"):
        raise NCLayersError(f"reduction={reduction!r}: choose 'mean', 'sum' or 'none'")
    if target is None:
        target = next_token_targets(input_ids, attention_mask)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    losses = F.cross_entropy(flat, target.reshape(-1), ignore_index=IGNORE, reduction="none")
    if reduction == "none":
        return losses.view(target.shape)
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / (target != IGNORE).sum().clamp_min(1)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    batches: Iterable,
    amp: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """Perplexity of a causal LM on held-out `batches` (tokenised (inputs, labels)
    pairs, labels ignored): exp(total next-token loss / counted positions), over every
    rank. Returns {"perplexity", "loss" (mean, nats), "tokens" (counted positions)}."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, positions
    was_training = model.training
    model.eval()
    try:
        for batch in progress_bar(batches, progress, "perplexity"):
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
                raise NCLayersError(
                    "batches: perplexity needs tokenised batches (a mapping with input_ids), "
                    f"got {type(inputs).__name__}"
                )
            inputs = to_device({k: v for k, v in inputs.items() if k != "labels"}, device)
            with autocast(device, amp):
                logits = output_logits(run_model(model, inputs))
            ids = inputs["input_ids"]
            target = next_token_targets(ids, inputs.get("attention_mask"))
            sums[0] += lm_loss(logits, ids, reduction="sum", target=target)
            sums[1] += (target != IGNORE).sum()
    finally:
        model.train(was_training)
    loss, tokens = all_sum(sums).tolist()
    if tokens == 0:
        raise NCLayersError("batches: no position with a next token; the sequences are too short")
    return {"perplexity": math.exp(loss / tokens), "loss": loss / tokens, "tokens": int(tokens)}


__all__ = ["IGNORE", "lm_loss", "next_token_targets", "perplexity"]
