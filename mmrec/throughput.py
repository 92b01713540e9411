"""Training throughput: tokens/s, MFU and peak memory of a run, and the device's matmul
rate that MFU is measured against."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch

from mmrec.distributed import World


@contextlib.contextmanager
def keeping_matmul_precision() -> Iterator[None]:
    """Put back the caller's ``torch.get_float32_matmul_precision()`` when the block ends:
    training and the benchmarks set it for a run (``train.tf32``), and other code in the
    process (``bench all``'s next benchmark, a test, a notebook) keeps its own."""
    precision = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> float:
    """Median wall milliseconds of ``fn`` over ``repeat`` runs, synchronised, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def matmul_tflops(device: torch.device, n: int = 8192) -> float:
    """The device's measured bf16 matmul rate (random data), the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, device, warmup=3, repeat=10)
    return 2 * n**3 / ms / 1e9


class Throughput:
    """Tokens/s of the whole run (all processes), MFU, and each process's peak GPU memory.

    MFU is the model's training FLOPs per token (``LanguageModel.flops_per_token``:
    6 x parameters plus what each block's sequence mixing adds; activation checkpointing's
    recomputation is not counted) times tokens/s, over ``peak_tflops`` per device times
    the number of devices. The summary leaves out the first steps, which compile."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_tflops: float | None, world: World,
                 warmup: int = 3):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_tflops = peak_tflops  # per device
        self.peak_flops = peak_tflops * 1e12 * world.size if peak_tflops else None  # all devices together
        self.world, self.device, self.warmup = world, world.device, warmup
        self.seconds: list[float] = []
        self.peak_gib: list[float] | None = None  # per rank
        self.reserved_gib: list[float] | None = None

    def step(self, seconds: float) -> dict:
        self.seconds.append(seconds)
        speed = {"step_s": seconds, "tokens_per_s": self.tokens_per_step / seconds}
        if self.peak_flops:
            speed["mfu"] = self.flops_per_token * speed["tokens_per_s"] / self.peak_flops
        if self.device.type == "cuda":  # each rank's peak so far, allocated and reserved (a collective)
            peaks = self.world.gather_floats([torch.cuda.max_memory_allocated(self.device) / 2**30,
                                              torch.cuda.max_memory_reserved(self.device) / 2**30])
            self.peak_gib, self.reserved_gib = [a for a, _ in peaks], [r for _, r in peaks]
            speed["peak_gib"], speed["peak_reserved_gib"] = self.peak_gib, self.reserved_gib
        return speed

    @staticmethod
    def postfix(speed: dict) -> dict:
        shown = {}
        if "mfu" in speed:
            shown["mfu"] = f"{100 * speed['mfu']:.1f}%"
        if "peak_gib" in speed:
            shown["mem"] = f"{max(speed['peak_gib']):.1f}G"
        return shown

    def summary(self) -> dict | None:
        """Steady-state figures over the steps after the first ``warmup`` (all steps if too few)."""
        if not self.seconds:
            return None
        timed = self.seconds[self.warmup:] if len(self.seconds) > self.warmup else self.seconds
        out = {"steps_timed": len(timed), "step_s": sum(timed) / len(timed),
               "tokens_per_s": self.tokens_per_step * len(timed) / sum(timed)}
        if self.peak_flops:
            out["mfu"] = self.flops_per_token * out["tokens_per_s"] / self.peak_flops
            out["peak_tflops"] = self.peak_tflops
        if self.peak_gib is not None:
            out["peak_gib"], out["peak_reserved_gib"] = self.peak_gib, self.reserved_gib
        return out

    @staticmethod
    def describe(summary: dict) -> str:
        text = (f"throughput: {summary['tokens_per_s']:,.0f} tokens/s, {summary['step_s']:.3f} s/step "
                f"(mean of the last {summary['steps_timed']} steps)")
        if "mfu" in summary:
            text += f", MFU {100 * summary['mfu']:.1f}%"
        if "peak_gib" in summary:
            text += (", peak memory per GPU " + " / ".join(f"{g:.1f}" for g in summary["peak_gib"])
                     + " GiB allocated, " + " / ".join(f"{g:.1f}" for g in summary["peak_reserved_gib"]) + " reserved")
        return text
