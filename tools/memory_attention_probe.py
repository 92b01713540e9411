"""The memory's attention alone, at ``1b``'s shapes: which kernel runs it and how fast.

``hds`` reads with one ``scaled_dot_product_attention`` per chunk: 512 queries of 16 heads
over 336 slots (256 + 64 + 16, the three HDS levels) of 4 banks, head width 128, the banks
shared by groups of query heads (``enable_gqa``). This times forward + backward of the read
with the queries laid out two ways (heads of a contiguous ``[N, L, heads * e]`` tensor, or
a slice of the block's fused projection, ``--projection-width`` wide, as the model passes
them), grouped, with the keys repeated per head, or as plain products and a softmax (which
inductor fuses when compiled), eager and compiled, and names the kernel that takes the most
time in each.

``--parts write`` times the write's pooling: ``--write-slots`` learned queries per bank
over each chunk's keys, head width ``--slot-dim`` (512 in ``1b``, past what the flash and
cuDNN kernels take), as SDPA, as plain products under autograd, and as ``hds`` runs it
(the products with a backward that recomputes the weights).

On a GPU machine, from the repository root::

    python tools/memory_attention_probe.py [--chunks 32] [--backends] [--parts read write]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def top_kernel(fn) -> str:
    """The name of the CUDA kernel with the most time in one call of ``fn``."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    return events[0].key[:70] if events else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=32, help="batch x chunks (1b at 8 x 2048: 32)")
    parser.add_argument("--queries", type=int, default=512, help="tokens per chunk: the read's queries, the write's keys")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--banks", type=int, default=4)
    parser.add_argument("--slots", type=int, default=336)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--projection-width", type=int, default=10240, help="the block's fused projection (1b: 10240)")
    parser.add_argument("--backends", action="store_true", help="also force each backend on the eager calls")
    parser.add_argument("--parts", nargs="+", choices=("read", "write"), default=["read"])
    parser.add_argument("--write-slots", type=int, default=256, help="level-0 slots per bank (1b: 256)")
    parser.add_argument("--slot-dim", type=int, default=512, help="width of a slot (1b: 512)")
    args = parser.parse_args()
    torch.manual_seed(0)
    n, length, heads, banks, e = args.chunks, args.queries, args.heads, args.banks, args.head_dim
    dense = torch.randn(n, length, heads * e, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    wide = torch.randn(n, length, args.projection_width, device="cuda", dtype=torch.bfloat16)
    # the slice as a leaf of its own, with the projection's strides: its gradient is the
    # slice's, not a zero-filled gradient of the whole projection on every step
    sliced = wide[..., : heads * e].detach().requires_grad_()
    layouts = {"dense q": lambda: dense, "projection q": lambda: sliced}
    kv = torch.randn(2, n, banks, args.slots, e, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(n, heads, length, e, device="cuda", dtype=torch.bfloat16)

    def grouped(q):
        return scaled_dot_product_attention(q.unflatten(-1, (heads, e)).transpose(1, 2), kv[0], kv[1], enable_gqa=True)

    def repeated(q):
        group = heads // banks
        keys, values = kv[0].repeat_interleave(group, 1), kv[1].repeat_interleave(group, 1)
        return scaled_dot_product_attention(q.unflatten(-1, (heads, e)).transpose(1, 2), keys, values)

    def unfused(q):
        """The read as plain products and a softmax (336 scores a query), for inductor to fuse."""
        queries = q.unflatten(-1, (heads, e)).transpose(1, 2).unflatten(1, (banks, -1))  # [N, banks, group, L, e]
        scores = queries @ kv[0].unsqueeze(2).transpose(-1, -2) * e**-0.5
        return (scores.softmax(-1) @ kv[1].unsqueeze(2)).flatten(1, 2)

    if "write" in args.parts:
        probe_write(n, length, banks, args.write_slots, args.slot_dim)
    if "read" not in args.parts:
        return
    print(f"{'read':9s} {'queries':13s} {'mode':9s} {'fwd+bwd':>9s}  top kernel")
    for read in (grouped, repeated, unfused):
        for layout, q in layouts.items():
            for mode in ("eager", "compiled"):
                print(f"{read.__name__:9s} {layout:13s} {mode:9s} {timed(read, q, grad, mode)}")
                if args.backends and mode == "eager" and read is not unfused:
                    for label, backend in BACKENDS.items():
                        try:
                            with sdpa_kernel(backend), warnings.catch_warnings():
                                warnings.simplefilter("ignore")
                                ms = f"{do_bench(step):7.3f} ms"
                        except RuntimeError as error:
                            ms = f"not available ({str(error).splitlines()[0][:50]})"
                        print(f"{'':33s} {label:9s} {ms}")


def timed(fn, inputs, grad: torch.Tensor, mode: str) -> str:
    """Forward + backward of ``fn(inputs())`` eager or compiled: time and top kernel."""
    fn = torch.compile(fn, dynamic=False) if mode == "compiled" else fn

    def step():
        fn(inputs()).backward(grad)

    try:
        return f"{do_bench(step):7.3f} ms  {top_kernel(step)}"
    except Exception as error:  # noqa: BLE001 - a mode that fails is a result too
        return f"failed: {str(error).splitlines()[0][:80]}"


def probe_write(n: int, length: int, banks: int, slots: int, dim: int) -> None:
    """The write's pooling: ``slots`` learned queries per bank attend over each chunk's keys."""
    queries = torch.randn(banks, slots, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(n, length, 2, banks, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(n, banks, slots, dim, device="cuda", dtype=torch.bfloat16)

    def sdpa(kv):
        keys, values = kv.permute(2, 0, 3, 1, 4)  # [N, banks, C, dim] each
        return scaled_dot_product_attention(queries.expand(n, -1, -1, -1), keys, values)

    def products(kv):
        keys, values = kv.permute(2, 0, 3, 1, 4)
        scores = torch.einsum("msd,bmcd->bmsc", queries, keys) * dim**-0.5
        return scores.softmax(-1).to(values.dtype) @ values

    def recomputing(kv):
        """As ``hds`` runs it: the products, with a backward that recomputes the weights."""
        from mmrec.layers.hds_memory import _SlotPooling

        keys, values = kv.permute(2, 0, 3, 1, 4)
        return _SlotPooling.apply(queries * dim**-0.5, keys, values)

    print(f"{'write':11s} {'':11s} {'mode':9s} {'fwd+bwd':>9s}  top kernel")
    for write in (sdpa, products, recomputing):
        for mode in ("eager", "compiled"):
            print(f"{write.__name__:11s} {'':11s} {mode:9s} {timed(write, lambda: kv, grad, mode)}")


if __name__ == "__main__":
    main()
