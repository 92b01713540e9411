"""How much memory a recipe's model needs to train, known before it is built.

A model whose weights, gradients and AdamW state alone exceed the memory it would train in
is refused up front, with the figures, instead of ending in an allocator traceback or a
build that runs for minutes.
"""

from __future__ import annotations

import os

import torch

from mmrec.model import LanguageModel


class ModelTooLarge(ValueError):
    """The recipe's model cannot train in this device's memory."""


BYTES_PER_PARAMETER = 16  # fp32 weight and gradient, AdamW's two fp32 moments


def estimate_parameters(config) -> tuple[int, bool]:
    """The parameter count of the model ``config`` (a recipe's model section) describes,
    without building it: ``(count, exact)``. Models of one and two layers are built on
    the meta device (no memory, no time) and the count extrapolated to ``n_layers``:
    exact when every layer has the same parameters, as in the built-in blocks. Each group
    of a hybrid stack's ``layer_overrides`` adds, per layer it names, what a one-layer
    model with the group's block has more than one with the model's. Where that cannot be
    done (a width so large that a weight's element count overflows, or a block that
    cannot be built on the meta device) it is a lower bound: the embedding and the head."""
    lower = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
    if max(config.d_model, config.ffn_dim, config.vocab_size) ** 2 > 2**60:
        return lower, False

    groups = getattr(config, "layer_overrides", None) or ()

    def count(n_layers: int, overrides: list | None = None) -> int:
        update = {"n_layers": n_layers, **({"layer_overrides": overrides or []} if groups else {})}
        return LanguageModel(config.model_copy(update=update)).num_parameters()

    try:
        with torch.device("meta"):
            one, two = count(1), count(2)
            total = one + (two - one) * (config.n_layers - 1)
            for group in groups:  # validation names each layer once
                named = len(group.indices(config.n_layers))
                total += named * (count(1, [group.model_copy(update={"layers": [0], "every": None, "offset": 0})]) - one)
    except Exception:  # noqa: BLE001 - a plugin's block that needs real tensors to be built
        return lower, False
    return total, True


def memory_of(device: torch.device) -> tuple[int, str] | None:
    """``(bytes, what)``: the memory one process trains in, or None when unknown."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"{props.name} ({device}) has"
    if device.type == "cpu":
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return None
        return total, "this machine has"
    return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    raise AssertionError


def check_fits(config, device: torch.device, world: int = 1) -> None:
    """Refuse a model whose weights, gradients and AdamW state alone exceed the memory it
    would train in. With ``world`` processes (FSDP) each holds a ``1/world`` share; the
    processes on one host share its RAM (CPU) or have a GPU each (CUDA). Activations come
    on top, so passing is no promise that a run fits."""
    memory = memory_of(device)
    if memory is None:
        return
    available, what = memory
    count, exact = estimate_parameters(config)
    share = count * BYTES_PER_PARAMETER / world
    on_host = world > 1 and device.type == "cpu"
    need = share * (int(os.environ.get("LOCAL_WORLD_SIZE", world)) if on_host else 1)
    if need <= available:
        return
    size = f"{'~' if exact else 'at least '}{count:.3g} parameters"
    per = ""
    if world > 1:
        per = (f", {human_bytes(share)} per process, {human_bytes(need)} for the processes on this machine" if on_host
               else f", {human_bytes(share)} per process of {world}")
    hint = "make the model smaller (model.d_model, model.n_layers, model.ffn_dim, model.vocab_size)"
    if device.type == "cuda":
        hint += ", or shard it over more GPUs (torchrun --nproc-per-node N)"
    raise ModelTooLarge(f"the model has {size} and needs {'~' if exact else 'at least '}"
                     f"{human_bytes(count * BYTES_PER_PARAMETER)} for its weights, gradients and AdamW state "
                     f"({BYTES_PER_PARAMETER} bytes a parameter{per}), more than the {human_bytes(available)} "
                     f"{what}; {hint}")
