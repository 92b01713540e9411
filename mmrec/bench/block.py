"""One MM-Rec block's forward and backward latency, HEM (fused projection) on and off, and
the share of the time each part of the block takes.

The parts are timed on their own, forward plus backward, on the inputs they see inside
the block: projection (RMSNorm and HEM), recurrence (MDI and the scan), memory (write,
update and read), output and FFN. The whole block is timed too; the parts' sum differs
from it by what running them apart costs (extra launches, no overlap).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import mmrec
from mmrec.bench.common import run_metadata, time_ms, write_json


def add_subcommand(commands) -> None:
    parser = commands.add_parser("block", help="one block's latency, HEM on/off, time per part", description=__doc__)
    parser.add_argument("--recipe", default="1b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--baseline", default="transformer-1b", help="Transformer recipe for the saved-bytes count")
    parser.add_argument("--shrink", type=int, default=1, help="divide the widths by this for the saved-bytes count")
    parser.add_argument("--saved-only", action="store_true", help="only count saved bytes per token (no timing)")
    parser.add_argument("--layer", type=int, default=None,
                        help="in a hybrid stack (layer_overrides): the layer whose block is measured (default: the "
                             "first that keeps the model's own block, e.g. 1 in the shipped hybrids)")
    parser.add_argument("--out", type=Path)
    parser.set_defaults(run=run)


def first_plain_layer(model) -> int:
    """The first layer that no ``layer_overrides`` group names (0 without overrides)."""
    groups = getattr(model, "layer_overrides", None) or ()
    return next((i for i in range(model.n_layers) if not any(group.names(i) for group in groups)), 0)


def shrunk(recipe: str, shrink: int, extra: tuple[str, ...] = (), layer: int | None = None) -> "mmrec.LanguageModel":
    """A one-block model of ``recipe`` with its widths divided by ``shrink`` (heads, slots and
    chunk size kept); in a hybrid stack (``layer_overrides``) the block is layer ``layer``'s,
    by default the first that keeps the model's own block."""
    loaded = mmrec.recipes.load(recipe)
    data, model = loaded.model_dump(mode="json"), loaded.model
    layer = first_plain_layer(model) if layer is None else layer
    if not 0 <= layer < model.n_layers:
        raise ValueError(f"--layer {layer}: {recipe} has layers 0 to {model.n_layers - 1}")
    if getattr(model, "layer_overrides", None):
        model = model.for_layer(layer)
        data["model"] = model.model_dump(mode="json", exclude={"layer_overrides"})
    overrides = ["model.n_layers=1", f"model.d_model={model.d_model // shrink}", f"model.ffn_dim={model.ffn_dim // shrink}"]
    for width in ("dim", "key_dim"):  # the memory's own widths (hds: dim; none: key_dim)
        if model.arch == "mmrec" and getattr(model.memory, width, None):
            overrides.append(f"model.memory.{width}={max(getattr(model.memory, width) // shrink, 1)}")
    return mmrec.build(data, overrides + list(extra))


def saved_bytes_per_token(block: torch.nn.Module, x: torch.Tensor) -> float:
    """Bytes that autograd saves for backward in one forward of ``block`` on ``x``
    ``[B, T, d]``, per token. Each storage counts once (views of one tensor share it, a
    broadcast view costs its small storage); parameters and buffers don't count."""
    params = {p.untyped_storage().data_ptr() for p in [*block.parameters(), *block.buffers()]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x, return_aux_loss=True)
    del out
    return sum(storages.values()) / (x.shape[0] * x.shape[1])


def partitioned(block: torch.nn.Module) -> torch.nn.Module:
    """``block`` compiled with the partitioner ``torch.compile`` uses (min-cut: cheap
    elementwise work is recomputed in backward, not saved) but run eagerly, no code
    generation: what a compiled block saves, countable on any device."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    run_eagerly = lambda graph, _: make_boxed_func(graph)  # noqa: E731
    backend = aot_autograd(fw_compiler=run_eagerly, bw_compiler=run_eagerly, partition_fn=min_cut_rematerialization_partition)
    return torch.compile(block, backend=backend)


def saved_bytes_table(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Saved bytes per token, one block of ``args.recipe`` and of ``args.baseline``."""
    rows = []
    for recipe in (args.recipe, args.baseline):
        with torch.device(device):
            model = shrunk(recipe, args.shrink, layer=args.layer).to(dtype)
        block = model.blocks[0].train()
        x = torch.randn(args.batch, args.length, model.config.d_model, device=device, dtype=dtype, requires_grad=True)
        config = mmrec.recipes.load(recipe).model
        uniform = not getattr(config, "layer_overrides", None)  # else the layers save different amounts
        layer = first_plain_layer(config) if args.layer is None else args.layer
        for mode, module in (("eager", block), ("compiled", partitioned(block))):
            per_token = saved_bytes_per_token(module, x)
            rows.append({"recipe": recipe, "layer": layer, "mode": mode, "shrink": args.shrink, "d_model": model.config.d_model,
                         "saved_bytes_per_token": per_token, "layers": config.n_layers,
                         "model_saved_bytes_per_token": per_token * config.n_layers if uniform else None})
        torch._dynamo.reset()
        del model, block, x
    return rows


def forward_backward(fn, inputs):
    """A closure running ``fn(*inputs)`` and backpropagating random gradients into it."""
    def step():
        outputs = fn(*inputs)
        outputs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if torch.is_tensor(o) and o.requires_grad]
        if outputs:  # a part with nothing to learn (the `none` memory) runs its forward only
            torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
    return step


def block_parts(block, x):
    """``name -> closure`` for each part of an MM-Rec block, fed what it sees in the block."""
    with torch.no_grad():
        u = block.norm(x)
        p = {k: v.detach().requires_grad_() for k, v in block.proj(u).items()}
        log_decay = block.log_decay(p["z"], p["k"]).detach()
        extra = {name: p[name] for name in block.recurrence_inputs}  # e.g. the delta rule's q_r, k_r, beta
        h, _ = block.recurrence(p["z"], log_decay, p.get("g"), **extra)
        context, _ = block.memory(p.get("q"), p["k"], p.get("v"), block.chunk_size)
    h = h.to(x.dtype).detach().requires_grad_()
    contexts = () if context is None else (context.detach().requires_grad_(),)  # none for the `none` memory

    def projection(x):
        return tuple(block.proj(block.norm(x)).values())

    def recurrence(z, k, g, *extra_values):
        return block.recurrence(z, block.log_decay(z, k), g, **dict(zip(extra, extra_values)))[0]

    def memory(q, k, v):
        return block.memory(q, k, v, block.chunk_size)[0]

    def output(x, h, *context):
        state = block.state_norm(h)
        y = x + block.out(state + context[0] if context else state)
        return y + block.ffn(block.ffn_norm(y))

    return {
        "projection (norm + HEM)": forward_backward(projection, (x,)),
        "recurrence (MDI + scan)": forward_backward(recurrence, (p["z"], p["k"], p.get("g"), *extra.values())),
        "memory (write, update, read)": forward_backward(memory, (p.get("q"), p["k"], p.get("v"))),
        "output + FFN": forward_backward(output, (x, h, *contexts)),
    }


def run(args: argparse.Namespace) -> int:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    meta = {**run_metadata(), "dtype": args.dtype, "recipe": args.recipe, "batch": args.batch, "length": args.length}
    saved = saved_bytes_table(args, device, dtype)
    print(f"\nsaved for backward, one block, eager and min-cut partitioned (as compiled), {args.dtype}, batch {args.batch} x {args.length}, widths / {args.shrink}")
    for row in saved:
        total = (f"x {row['layers']} blocks = {row['model_saved_bytes_per_token'] / 1024:8.1f} KiB/token"
                 if row["model_saved_bytes_per_token"] is not None else f"(layer {row['layer']} of a hybrid stack)")
        print(f"    {row['recipe']:<16} {row['mode']:<8} d_model {row['d_model']:>5}: {row['saved_bytes_per_token'] / 1024:8.2f} KiB/token/block, "
              + total)
    if args.saved_only:
        write_json(args.out, {**meta, "saved": saved})
        return 0
    rows = []
    for hem in (True, False):
        with torch.device(device):
            model = shrunk(args.recipe, 1, (f"model.hem={str(hem).lower()}",), layer=args.layer).to(dtype)
        block = model.blocks[0].train()
        x = torch.randn(args.batch, args.length, model.config.d_model, device=device, dtype=dtype, requires_grad=True)
        whole = time_ms(forward_backward(lambda x: block(x, return_aux_loss=True)[0], (x,)), device, 2, args.repeat)
        parts = {name: time_ms(step, device, 2, args.repeat) for name, step in block_parts(block, x).items()}
        row = {"hem": hem, "block_ms": whole, "parts_ms": parts, "tokens_per_s": args.batch * args.length / whole * 1e3}
        rows.append(row)
        del model, block, x
    rows[0]["speedup_vs_separate"] = rows[1]["block_ms"] / rows[0]["block_ms"]
    print(f"\n{meta['device']}, {args.dtype}, recipe {args.recipe}, one block, batch {args.batch} x {args.length}, forward + backward")
    for row in rows:
        total = sum(row["parts_ms"].values())
        label = "HEM on " if row["hem"] else "HEM off"
        extra = f"  ({row['speedup_vs_separate']:.2f}x vs HEM off)" if "speedup_vs_separate" in row else ""
        print(f"{label}: block {row['block_ms']:.3f} ms, {row['tokens_per_s']:.0f} tokens/s{extra}")
        for name, ms in row["parts_ms"].items():
            print(f"    {name:<30} {ms:8.3f} ms  {100 * ms / total:5.1f}%")
    write_json(args.out, {**meta, "saved": saved, "results": rows})
    return 0
