"""What every benchmark records: device, versions, date and the command, and its JSON."""

from __future__ import annotations

import datetime
import gc
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from mmrec.metrics import finite_or_null
from mmrec.throughput import synchronize, time_ms  # noqa: F401 - the benchmarks time with these


def run_metadata() -> dict:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m mmrec.bench " + shlex.join(sys.argv[1:]),
        "torch": torch.__version__,
    }


def write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite_or_null(payload), indent=1, allow_nan=False) + "\n")  # strict JSON: NaN as null
    print(f"wrote {path}")


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        # the last measurement's buffers may sit in reference cycles (a decoder and its
        # captured graphs): free them before the next one is measured
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def forward_passes(fn: Callable[..., tuple], inputs: list, grad_outputs: Callable[[list], list],
                   differentiable: list[int] | None = None) -> dict[str, Callable[[], object]]:
    """Two calls to time: ``fwd``, ``fn(*inputs)`` without gradients, and ``fwd+bwd``, the
    call and then ``autograd.grad`` of its outputs that need one (with gradients
    ``grad_outputs(those outputs)``) with respect to the inputs at ``differentiable`` (all
    by default; one the call does not use gets zeros)."""
    differentiable = range(len(inputs)) if differentiable is None else differentiable
    leaves = [x.detach().requires_grad_() if i in differentiable else x for i, x in enumerate(inputs)]

    def forward():
        with torch.no_grad():
            return fn(*inputs)

    def forward_backward():
        used = [o for o in fn(*leaves) if o.requires_grad]
        return torch.autograd.grad(used, [leaves[i] for i in differentiable], grad_outputs(used),
                                   allow_unused=True, materialize_grads=True)

    return {"fwd": forward, "fwd+bwd": forward_backward}


def add_matmul_precision_argument(parser) -> None:
    """``--precision``: the float32 matrix-product precision a benchmark runs at, training's
    by default (``train.tf32`` sets ``high``)."""
    parser.add_argument("--precision", default="high", choices=["highest", "high", "medium"],
                        help="torch.set_float32_matmul_precision, as training sets it (train.tf32: high)")


_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what the host-time measures wait for


def do_bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` on the GPU (``triton.testing.do_bench``: CUDA events,
    the L2 cache flushed between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def host_ms(fn: Callable[[], object], calls: int = 50) -> float:
    """Median host milliseconds to issue one call of ``fn``: each call starts on an idle
    GPU and is timed until it returns, without waiting for its kernels. On a CPU device the
    work itself is synchronous, so this is the whole call."""
    fn()
    times = []
    for _ in range(calls):
        synchronize(_DEVICE)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    synchronize(_DEVICE)
    return 1e3 * sorted(times)[len(times) // 2]


def host_loop_ms(fn: Callable[[], object], calls: int = 50) -> float:
    """Mean host milliseconds per call of ``fn`` issued back to back, as a training loop
    issues them (the GPU's queue holds thousands of launches, so the loop does not wait for
    it). Lower than ``host_ms`` where a call from an idle GPU pays for cold caches."""
    fn()
    synchronize(_DEVICE)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    synchronize(_DEVICE)
    return 1e3 * elapsed / calls


def graph_ms(fn: Callable[[], object]) -> float | None:
    """``fn`` captured once as a CUDA graph and replayed: its GPU time without host
    overhead; None (with the reason on stderr) when it cannot be captured."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up outside the capture (compiles, allocator)
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return do_bench_ms(graph.replay)
    except Exception as error:  # noqa: BLE001 - report, don't stop the run
        print(f"CUDA graph capture failed: {type(error).__name__}: {error}", file=sys.stderr)
        return None


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def record(rows: list[dict], row: dict, measure: Callable[[], dict], device: torch.device) -> dict:
    """Fill ``row`` with ``measure()``'s figures and append it; running out of memory is a
    result (``row["error"]``), not a crash."""
    try:
        row.update(measure())
    except Exception as error:  # noqa: BLE001 - anything else is re-raised below
        if not is_out_of_memory(error):
            raise
        row["error"] = "out of memory"
    reset_peak_memory(device)
    rows.append(row)
    print({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return row


def compare_to_baseline(rows: list[dict], same: tuple[str, ...], is_baseline: Callable[[dict], bool], name: str) -> None:
    """Give each measured row its speed (and peak memory) relative to the baseline row that
    was measured with the same ``same`` fields: ``speedup_vs_<name>``, ``memory_vs_<name>``."""
    baselines = {tuple(r[k] for k in same): r for r in rows if is_baseline(r) and "tokens_per_s" in r}
    for row in rows:
        other = baselines.get(tuple(row[k] for k in same))
        if other is None or row is other or "tokens_per_s" not in row:
            continue
        row[f"speedup_vs_{name}"] = row["tokens_per_s"] / other["tokens_per_s"]
        if row.get("peak_gib") and other.get("peak_gib"):
            row[f"memory_vs_{name}"] = row["peak_gib"] / other["peak_gib"]
