"""Where a training step of a recipe spends its GPU time: the top CUDA kernels.

Builds the recipe with ``n_layers`` layers (2 by default: the blocks are alike), in bf16
with each block compiled, as ``python -m mmrec.bench model`` trains it, runs three
warm-up steps, then profiles two steps and prints torch.profiler's table sorted by CUDA
time. From the repository root, on a GPU machine::

    python tools/profile_step.py docs/results/recipes/1b-delta.json [--layers 2] [--length 2048] [--batch 8]

``--by-op`` lists PyTorch operators with their input shapes instead of kernels (which ops
of which tensors the GPU time goes to: an ``aten::add`` of ``[8, 16, 32, 64, 256]`` is a
different story from one of ``[8, 2048, 2048]``).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import mmrec
from mmrec.bench.common import add_matmul_precision_argument
from mmrec.distributed import compile_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=30, help="kernels to list")
    parser.add_argument("--by-op", action="store_true", help="operators by input shape instead of kernels")
    add_matmul_precision_argument(parser)
    args = parser.parse_args()
    torch.set_float32_matmul_precision(args.precision)
    overrides = [f"model.n_layers={args.layers}", f"model.max_seq_len={max(args.length, 2048)}"]
    model = mmrec.build(args.recipe, overrides).to(torch.bfloat16).cuda()
    compile_blocks(model)  # as training compiles them
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.length), device="cuda")

    def step():
        model(ids, targets=ids, return_state=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if args.by_op else [ProfilerActivity.CUDA]
    with profile(activities=activities, record_shapes=args.by_op) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(f"{args.recipe}: {args.layers} layers, batch {args.batch} x {args.length}, two steps")
    events = prof.key_averages(group_by_input_shape=args.by_op)
    print(events.table(sort_by="self_cuda_time_total" if args.by_op else "cuda_time_total", row_limit=args.rows,
                       max_name_column_width=90, max_shapes_column_width=80))


if __name__ == "__main__":
    main()
