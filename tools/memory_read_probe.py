"""The memory read's attention alone, at ``1b``'s shapes: which SDPA backend runs it and how fast.

``hds`` reads with one ``scaled_dot_product_attention`` per chunk: 512 queries of 16 heads
over 336 slots (256 + 64 + 16, the three HDS levels) of 4 banks, head width 128, the banks
shared by groups of query heads (``enable_gqa``). This times forward + backward of that
call (grouped, and with the keys repeated per head) under each backend, eagerly, and
lists the kernels of the default choice. Compare with the read's kernel in a compiled
training step (``tools/profile_step.py 1b``). On a GPU machine, from the repository root::

    python tools/memory_read_probe.py [--chunks 32]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=32, help="batch x chunks (1b at 8 x 2048: 32)")
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--banks", type=int, default=4)
    parser.add_argument("--slots", type=int, default=336)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    group = args.heads // args.banks
    q = torch.randn(args.chunks, args.queries, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16)
    q = q.transpose(1, 2).requires_grad_()  # [N, heads, L, e], a view of [N, L, heads * e] as the model has it
    kv = torch.randn(2, args.chunks, args.banks, args.slots, args.head_dim, device="cuda", dtype=torch.bfloat16,
                     requires_grad=True)
    grad = torch.randn(args.chunks, args.heads, args.queries, args.head_dim, device="cuda", dtype=torch.bfloat16)
    calls = {
        "grouped": lambda: scaled_dot_product_attention(q, kv[0], kv[1], enable_gqa=True),
        "repeated": lambda: scaled_dot_product_attention(q, kv[0].repeat_interleave(group, 1),
                                                         kv[1].repeat_interleave(group, 1)),
    }
    for name, call in calls.items():
        for label, backend in BACKENDS.items():
            try:
                with sdpa_kernel(backend) if backend else torch.enable_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ms = f"{do_bench(lambda call=call: call().backward(grad)):.3f} ms"
            except RuntimeError as error:
                ms = f"not available ({str(error).splitlines()[0][:60]})"
            print(f"{name:9s} {label:9s} forward + backward {ms}")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        calls["grouped"]().backward(grad)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6, max_name_column_width=90))


if __name__ == "__main__":
    main()
