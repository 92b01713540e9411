"""Sampling text from a model.

The prompt runs through the model once; every new token is then a single-token step that
carries the model's ``State``. For MM-Rec that state has a fixed size, so each token
costs the same whatever the context length; a Transformer carries its KV cache.
"""

from __future__ import annotations

import torch

__all__ = ["generate"]


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Mask (to -inf) every logit outside the top ``top_k`` and outside the smallest set
    whose probability reaches ``top_p``. ``logits``: ``[B, V]``."""
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p; the best always stays
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    state=None,
) -> torch.LongTensor:
    """Continue ``prompt_ids`` (``[T]`` or ``[B, T]``, at least one token) by
    ``max_new_tokens`` sampled tokens; returns prompt and continuation, same rank as the
    prompt. ``temperature <= 0`` picks the most likely token. ``seed`` makes the sample
    reproducible without touching the global RNG. ``state`` continues an earlier context
    (a ``State``, e.g. one loaded with ``State.load``) that the prompt follows."""
    if prompt_ids.dim() not in (1, 2) or prompt_ids.size(-1) == 0:
        raise ValueError("prompt_ids must be a non-empty [T] or [B, T] tensor of token ids")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    squeeze = prompt_ids.dim() == 1
    ids = prompt_ids[None] if squeeze else prompt_ids
    device = next((p.device for p in model.parameters()), ids.device)
    ids = ids.to(device=device, dtype=torch.long)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        out = model(ids, state=state)  # the prompt, once
        new = []
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = _filter_logits(logits / temperature, top_k, top_p)
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
            new.append(nxt)
            if len(new) < max_new_tokens:
                out = model(nxt, state=out.state)  # one token, carrying the state
    finally:
        model.train(was_training)
    ids = torch.cat([ids, *new], dim=1)
    return ids[0] if squeeze else ids
