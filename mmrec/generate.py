"""Sampling text from a model.

The prompt runs through the model once; every new token is then a single-token step that
carries the model's ``State``. For MM-Rec that state has a fixed size, so each token
costs the same whatever the context length; a Transformer carries its KV cache. On a GPU
the steps run through ``mmrec.decode.StaticDecoder``: static buffers, CUDA graphs
replayed per token (one more for the steps that complete a memory chunk), the same logits
as the eager step.
"""

from __future__ import annotations

import math
import numbers

import torch

from mmrec.decode import StaticDecoder, supports_static
from mmrec.state import StateError

__all__ = ["check_prompt", "check_sampling_options", "generate"]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_sampling_options(max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None) -> None:
    """Raise a ``ValueError`` naming the argument, its value and the valid range unless
    ``max_new_tokens`` is an integer >= 0, ``temperature`` a finite number >= 0, ``top_k``
    None or an integer >= 1, ``top_p`` None or a number in (0, 1], ``seed`` None or an
    integer. ``generate`` calls it first; a program can call it before loading a model."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 picks the most likely token), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None (no limit) or an integer >= 1, got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None (no limit) or a number in (0, 1], got {top_p!r}")
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed must be None or an integer, got {seed!r}")


def check_prompt(prompt_ids, vocab_size: int | None = None) -> None:
    """Raise a ``ValueError`` unless ``prompt_ids`` is a non-empty ``[T]`` or ``[B, T]``
    integer tensor whose ids lie in ``[0, vocab_size)`` (a bad id is named with its
    position); a ``TypeError`` if it is no tensor at all."""
    if not isinstance(prompt_ids, torch.Tensor):
        raise TypeError(f"prompt_ids must be a torch.Tensor of token ids, got {type(prompt_ids).__name__}")
    dtype = prompt_ids.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise ValueError(f"prompt_ids must be an integer tensor of token ids, got dtype {dtype}"
                         " (convert whole-number ids with .long())")
    if prompt_ids.dim() not in (1, 2) or 0 in prompt_ids.shape:
        raise ValueError(f"prompt_ids must be a non-empty [T] or [B, T] tensor of token ids, got shape {tuple(prompt_ids.shape)}")
    bad = prompt_ids < 0
    if vocab_size is not None:
        bad = bad | (prompt_ids >= vocab_size)
    if bad.any():
        position = tuple(bad.nonzero()[0].tolist())
        where = ", ".join(map(str, position))
        valid = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise ValueError(f"prompt_ids[{where}] is {prompt_ids[position].item()}, outside the model's vocabulary {valid}"
                         + ("; was the prompt encoded with this model's tokenizer?" if vocab_size is not None else ""))


def _vocab_size(model: torch.nn.Module) -> int | None:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None and isinstance(getattr(model, "embed", None), torch.nn.Embedding):
        size = model.embed.num_embeddings
    return size


def _check_state(state, model: torch.nn.Module, batch: int, device: torch.device) -> None:
    if not hasattr(state, "batch_size") or not hasattr(state, "layers"):
        raise ValueError(f"state must be a mmrec.State (e.g. out.state or State.load(...)), got {type(state).__name__}")
    if hasattr(model, "config_json"):
        state.check_compatible(model.config_json)
    if state.batch_size != batch:
        raise StateError(f"state has batch size {state.batch_size} but prompt_ids has {batch} row(s); "
                         "give a prompt of one row per sequence of the state")
    from mmrec.state import _flatten

    devices = {t.device for layer in state.layers for t in _flatten(layer).values()}
    if any(d.type != device.type or (d.index or 0) != (device.index or 0) for d in devices):
        raise StateError(f"state is on {', '.join(sorted(map(str, devices)))} but the model on {device}; "
                         "move it with state.to(device) or load it with State.load(..., device=...)")


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
    prompt. ``temperature == 0`` picks the most likely token. ``seed`` makes the sample
    reproducible without touching the global RNG. ``state`` continues an earlier context
    (a ``State``, e.g. one loaded with ``State.load``) that the prompt follows.

    ``cuda_graph``: decode with the static step (``mmrec.decode.StaticDecoder``), captured
    in a CUDA graph on a GPU; on CPU ``True`` runs the same static step without a graph.
    ``None`` (default): on for a CUDA model that has a static step (not sharded), outside
    autocast. ``compile``: the static step's ``compile`` option (``torch.compile`` each
    block's step: a slower start, for long generations).

    Every argument is checked first (``ValueError`` naming it, its value and the valid
    range; see :func:`check_sampling_options` and :func:`check_prompt`); a ``state`` must
    come from this model's config, have the prompt's batch size and be on its device
    (``StateError``, a ``ValueError``)."""
    check_sampling_options(max_new_tokens, temperature, top_k, top_p, seed)
    check_prompt(prompt_ids, _vocab_size(model))
    max_new_tokens, temperature, seed = int(max_new_tokens), float(temperature), None if seed is None else int(seed)
    top_k, top_p = None if top_k is None else int(top_k), None if top_p is None else float(top_p)
    squeeze = prompt_ids.dim() == 1
    ids = prompt_ids[None] if squeeze else prompt_ids
    device = next((p.device for p in model.parameters()), ids.device)
    if state is not None:
        _check_state(state, model, ids.shape[0], device)
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
            if temperature == 0:
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
