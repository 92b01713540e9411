"""Where a training step of a recipe spends its GPU time: the top CUDA kernels.

Builds the recipe with ``n_layers`` layers (2 by default: the blocks are alike), in bf16
with each block compiled, as ``python -m mmrec.bench model`` trains it, runs three
warm-up steps, then profiles two steps and prints torch.profiler's table sorted by CUDA
time. From the repository root, on a GPU machine::

    python tools/profile_step.py docs/results/recipes/1b-delta.json [--layers 2] [--length 2048] [--batch 8]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import mmrec
from mmrec.distributed import compile_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=30, help="kernels to list")
    args = parser.parse_args()
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
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(f"{args.recipe}: {args.layers} layers, batch {args.batch} x {args.length}, two steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))


if __name__ == "__main__":
    main()
