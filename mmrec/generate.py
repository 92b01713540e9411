"""Sampling text from a model.

The prompt runs through the model once; every new token is then a single-token step that
carries the model's ``State``. For MM-Rec that state has a fixed size, so each token
costs the same whatever the context length; a Transformer carries its KV cache. On a GPU
the steps run through ``mmrec.decode.StaticDecoder``: static buffers, CUDA graphs
replayed per token (one more for the steps that complete a memory chunk), the same logits
as the eager step.
"""

from __future__ import annotations

import torch

from mmrec.decode import StaticDecoder, supports_static

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
    cuda_graph: bool | None = None,
    compile: bool | str = False,
) -> torch.LongTensor:
    """Continue ``prompt_ids`` (``[T]`` or ``[B, T]``, at least one token) by
    ``max_new_tokens`` sampled tokens; returns prompt and continuation, same rank as the
    prompt. ``temperature <= 0`` picks the most likely token. ``seed`` makes the sample
    reproducible without touching the global RNG. ``state`` continues an earlier context
    (a ``State``, e.g. one loaded with ``State.load``) that the prompt follows.

    ``cuda_graph``: decode with the static step (``mmrec.decode.StaticDecoder``), captured
    in a CUDA graph on a GPU; on CPU ``True`` runs the same static step without a graph.
    ``None`` (default): on for a CUDA model that has a static step (not sharded), outside
    autocast. ``compile``: the static step's ``compile`` option (``torch.compile`` each
    block's step: a slower start, for long generations)."""
    if prompt_ids.dim() not in (1, 2) or prompt_ids.size(-1) == 0:
        raise ValueError("prompt_ids must be a non-empty [T] or [B, T] tensor of token ids")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    squeeze = prompt_ids.dim() == 1
    ids = prompt_ids[None] if squeeze else prompt_ids
    device = next((p.device for p in model.parameters()), ids.device)
    ids = ids.to(device=device, dtype=torch.long)
    # by default not under autocast either: its cast cache and a captured graph do not mix
    static = cuda_graph if cuda_graph is not None else (
        device.type == "cuda" and not torch.is_autocast_enabled("cuda") and supports_static(model))
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        out = model(ids, state=state)  # the prompt, once
        logits, decoder, new = out.logits[:, -1], None, []
        for _ in range(max_new_tokens):
            logits = logits.float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = _filter_logits(logits / temperature, top_k, top_p)
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
            new.append(nxt)
            if len(new) == max_new_tokens:
                break
            if static:  # one token through the static buffers
                if decoder is None:
                    end = out.state.position + max_new_tokens
                    decoder = StaticDecoder(model, out.state, max_length=end, cuda_graph=device.type == "cuda", compile=compile)
                    out = None  # the eager state is in the decoder's buffers now
                logits = decoder.step(nxt)
            else:  # one token, carrying the state
                out = model(nxt, state=out.state)
                logits = out.logits[:, -1]
    finally:
        model.train(was_training)
    ids = torch.cat([ids, *new], dim=1)
    return ids[0] if squeeze else ids
