"""What the Triton launchers share: their launch config, cached.

A launcher picks its config (tiles, warps, ``tl.dot`` precision) on every call, and that
Python runs in the call's host time. :func:`cached_config` wraps a ``pick_config`` so the
config of a shape is worked out once: per arguments and per
float32 matmul precision (:func:`float32_matmul_precision`), which decides the precision
of fp32 products.
A ``config`` that overrides entries is not cached (tuning and tests pass one).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def float32_matmul_precision() -> str:
    """``torch.get_float32_matmul_precision()``; where the per-backend switches
    (``torch.backends.cuda.matmul.fp32_precision``) are in use and it refuses to answer,
    their equivalent: ``"high"`` for ``"tf32"``, ``"highest"`` otherwise."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return "high" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "highest"


@functools.cache
def device_sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (0 for any other), which launch configs
    size their grids by."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def cached_config(pick_config: Callable[..., dict]) -> Callable[..., dict]:
    """``pick_config(*args, config=None, **kwargs)``, cached when ``config`` is empty; every
    call returns a fresh dict, so a launcher may edit its copy."""

    @functools.lru_cache(maxsize=256)
    def picked(args: tuple, kwargs: tuple, precision: str) -> dict:
        return pick_config(*args, **dict(kwargs))

    @functools.wraps(pick_config)
    def launch_config(*args, config: dict | None = None, **kwargs) -> dict:
        if config:
            return pick_config(*args, config=config, **kwargs)
        return dict(picked(args, tuple(kwargs.items()), float32_matmul_precision()))

    return launch_config
