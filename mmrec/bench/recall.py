"""Multi-query associative recall (MQAR, as in Zoology): can a model look up what it was told?

An example opens with ``pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (keys distinct, from
``[1, vocab/2)``; values distinct, from ``[vocab/2, vocab)``). Each key then comes back
once, and the token after it must be its value. The keys come back at alternate
positions of the rest of the sequence, slot ``x`` (1, 2, ...) drawn with probability
``∝ a·x^(a-1)`` without replacement (``a = 0.01``: most soon after the pairs, some far);
every other position holds a uniformly random token of the whole vocabulary. This is
Zoology's ``multiquery_ar``. With ``--min-gap G`` (``--long-range``: four memory chunks)
the slots start late enough that every key comes back at least ``G`` tokens after it was
given: only a memory that outlives several chunks can answer.

Every recipe is fitted to the task (``vocab_size``, ``d_model``, ``n_layers``,
``max_seq_len`` overridden) and trained at each rate of ``--lrs`` on the same stream of
fresh examples (with ``--train-pairs``, a mixture of pair counts, as Zoology trains:
easier examples start the lookup mechanism sooner; with ``--train-min-gaps``, a mixture of
minimum gaps, so that near pairs can start it for far ones; held-out examples keep
``--pairs`` and ``--min-gap``): AdamW with weight decay 0.1 on linear weights, warmup over 5% of the
steps then a cosine to zero, bf16 autocast on CUDA, and MM-Rec's planning loss added as
its recipe trains it. The loss counts query positions only. Accuracy is over every query
of a held-out set (another seed), also split by how far back the key was given: under one
chunk, one to four chunks, four chunks or more (``short``, ``medium``, ``long``; the chunk
of the first recipe that has a memory). Each recipe's best rate is the one of highest
accuracy, averaged over ``--seeds`` (seed ``S`` draws the training examples and initial
weights, the held-out examples come from ``S + 1``): whether a small model learns the
lookup within a budget can depend on the seed, so several seeds say how often it does.
With ``--jobs N`` the runs train side by side, one process each: small models leave a GPU
idle between kernel launches; tokens/s are then per process.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import mmrec
from mmrec.bench.common import record, run_metadata, synchronize, write_json
from mmrec.optim import build_optimizer, build_scheduler

IGNORE = -100  # the target of every position that is not a query
RECALLED = 0.9  # the accuracy the multi-seed summary counts runs against
BUCKETS = ("short", "medium", "long")  # gap < chunk, chunk <= gap < 4 chunks, gap >= 4 chunks
DEFAULT_CHUNK = 64  # buckets and --long-range when no recipe has a memory chunk


def mqar_batch(batch: int, seq_len: int, num_pairs: int, vocab_size: int = 8192, power_a: float = 0.01,
               min_gap: int = 0, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)``, both ``[batch, seq_len]`` int64 on the generator's device.

    ``targets[:, t]`` is what a language model's ``logits[:, t]`` should predict: at a
    query (a repeated key) its pair's value, elsewhere ``-100``. Pair ``i`` sits at
    positions ``2i, 2i+1``; its query at ``2i + gap`` with ``gap >= max(min_gap, 2)``.
    """
    half = vocab_size // 2
    first = max(2 * num_pairs, 2 * (num_pairs - 1) + min_gap)  # the first query slot
    slots = (seq_len - first) // 2  # query slots: first, first + 2, ...
    if num_pairs > half - 1 or slots < num_pairs:
        raise ValueError(f"{num_pairs} pairs do not fit: vocabulary {vocab_size}, {seq_len} tokens, min_gap {min_gap}")
    device = generator.device if generator is not None else torch.device("cpu")
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=device)  # noqa: E731
    keys = rand(batch, half - 1).topk(num_pairs, dim=1).indices + 1  # distinct, in random order
    values = rand(batch, vocab_size - half).topk(num_pairs, dim=1).indices + half
    inputs = torch.randint(0, vocab_size, (batch, seq_len), generator=generator, device=device)
    inputs[:, 0 : 2 * num_pairs : 2] = keys
    inputs[:, 1 : 2 * num_pairs : 2] = values
    # the power law over slots 1..slots, sampled without replacement: slot j of key i
    weights = power_a * torch.arange(1, slots + 1, device=device, dtype=torch.float32) ** (power_a - 1)
    slot = torch.multinomial(weights.expand(batch, slots), num_pairs, replacement=False, generator=generator)
    queries = first + 2 * slot
    inputs.scatter_(1, queries, keys)
    targets = torch.full_like(inputs, IGNORE).scatter_(1, queries, values)
    return inputs, targets


def query_gaps(inputs: Tensor, targets: Tensor, num_pairs: int) -> tuple[Tensor, Tensor]:
    """Each example's query positions ``[B, pairs]`` and, for each, its distance from the key it repeats."""
    positions = (targets != IGNORE).int().topk(num_pairs, dim=1).indices  # exactly ``pairs`` per row
    wanted = targets.gather(1, positions)
    pair = (wanted[:, :, None] == inputs[:, None, 1 : 2 * num_pairs : 2]).int().argmax(-1)
    return positions, positions - 2 * pair


def add_subcommand(commands) -> None:
    parser = commands.add_parser("recall", help="multi-query associative recall accuracy (Zoology MQAR), lr sweep",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["tiny", "transformer-tiny"], help="shipped names or JSON paths")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="recipe override for every recipe, after the task's (e.g. --set model.n_heads=2)")
    parser.add_argument("--seq-len", type=int, help="tokens per example (default 256; 4096 with --long-range)")
    parser.add_argument("--pairs", type=int, default=16, help="key-value pairs per example")
    parser.add_argument("--train-pairs", type=int, nargs="+", metavar="N",
                        help="train on a mixture: each batch's pairs drawn from these (Zoology trains on such a mixture); "
                             "held-out examples keep --pairs (default: train on --pairs only)")
    parser.add_argument("--train-min-gaps", type=int, nargs="+", metavar="G",
                        help="train on a mixture: each batch's minimum gap drawn from these; held-out examples keep "
                             "--min-gap (or --long-range's)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--power-a", type=float, default=0.01, help="power law of the query slots (1: uniform)")
    gaps = parser.add_mutually_exclusive_group()
    gaps.add_argument("--min-gap", type=int, default=0, help="every query at least this many tokens after its key")
    gaps.add_argument("--long-range", action="store_true", help="--min-gap of four memory chunks")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--eval-examples", type=int, default=2048, help="held-out examples (rounded up to whole batches)")
    parser.add_argument("--eval-every", type=int, default=0, help="also score the held-out set every N steps (0: at the end only)")
    parser.add_argument("--log-every", type=int, default=100, help="print the training loss every N steps")
    parser.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+", default=[0], metavar="S",
                        help="train every (recipe, lr) once per seed: training examples and initial weights from S, "
                             "held-out examples from S + 1")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--jobs", type=int, default=1, help="train this many (recipe, lr) runs side by side, one process each")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also draw accuracy per recipe (matplotlib)")
    parser.set_defaults(run=run)


def task_overrides(args: argparse.Namespace, lr: float) -> list[str]:
    """The recipe overrides that fit a recipe to the task and the sweep, then the user's ``--set``."""
    return [f"model.vocab_size={args.vocab}", f"model.d_model={args.d_model}", f"model.n_layers={args.layers}",
            f"model.max_seq_len={args.seq_len}", f"train.lr={lr}", "train.min_lr=0", "train.weight_decay=0.1",
            f"train.steps={args.steps}", f"train.warmup_steps={max(1, args.steps // 20)}",
            f"train.batch_size={args.batch}", f"train.seq_len={args.seq_len}", *args.overrides]


def memory_chunk(args: argparse.Namespace) -> int:
    """The memory chunk of the first recipe that has one: the unit of the gap buckets.
    Every recipe is validated here, so that a bad one fails before any training."""
    chunks = [getattr(mmrec.recipes.load(name, task_overrides(args, 1e-3)).model, "chunk_size", None) for name in args.recipes]
    return next((chunk for chunk in chunks if chunk is not None), DEFAULT_CHUNK)


def examples(args: argparse.Namespace, seed: int, device: torch.device, mixture: list[int] | None = None,
             gaps: list[int] | None = None):
    """The endless stream of ``(inputs, targets, pairs)`` batches of ``seed``, the same on
    every run of the same device: ``args.pairs`` per example and ``args.min_gap``, or with
    ``mixture`` a count and with ``gaps`` a minimum gap drawn from it for each batch."""
    generator = torch.Generator(device).manual_seed(seed)
    choice = torch.Generator().manual_seed(seed)  # on the CPU: drawing a count needs no device sync
    while True:
        pairs = args.pairs if not mixture else mixture[torch.randint(len(mixture), (), generator=choice)]
        min_gap = args.min_gap if not gaps else gaps[torch.randint(len(gaps), (), generator=choice)]
        yield *mqar_batch(args.batch, args.seq_len, pairs, args.vocab, args.power_a, min_gap, generator), pairs


@torch.no_grad()
def evaluate(forward, args: argparse.Namespace, seed: int, device: torch.device, autocast) -> dict:
    """Accuracy and loss over every query of ``seed``'s held-out set (drawn from ``seed + 1``),
    and accuracy per gap bucket."""
    stream = examples(args, seed + 1, device)
    correct, counts = torch.zeros(len(BUCKETS), device=device), torch.zeros(len(BUCKETS), device=device)
    loss = torch.zeros((), device=device)
    batches = math.ceil(args.eval_examples / args.batch)
    edges = torch.tensor([args.chunk, 4 * args.chunk], device=device)
    for _ in range(batches):
        inputs, targets, pairs = next(stream)
        positions, gaps = query_gaps(inputs, targets, pairs)
        with autocast():
            logits = forward(inputs, return_state=False, logits_at=positions).logits.float()
        wanted = targets.gather(1, positions)
        loss += F.cross_entropy(logits.flatten(0, 1), wanted.flatten())
        bucket = torch.bucketize(gaps, edges, right=True)
        correct.index_add_(0, bucket.flatten(), (logits.argmax(-1) == wanted).flatten().float())
        counts.index_add_(0, bucket.flatten(), torch.ones_like(bucket.flatten(), dtype=torch.float))
    correct, counts = correct.tolist(), counts.tolist()
    return {"accuracy": sum(correct) / sum(counts), "eval_loss": loss.item() / batches,
            "accuracy_by_gap": {b: c / n for b, c, n in zip(BUCKETS, correct, counts) if n},
            "queries_by_gap": dict(zip(BUCKETS, map(int, counts)))}


@torch.no_grad()
def state_bytes(recipe, args: argparse.Namespace) -> int:
    """Bytes of one sequence's float32 state after a whole example, whatever the weights:
    measured on a fresh CPU copy of the model, so it costs the trained run nothing."""
    inputs, _ = mqar_batch(1, args.seq_len, args.pairs, args.vocab, args.power_a, args.min_gap)
    return mmrec.build(recipe).eval()(inputs, return_state=True).state.nbytes()


def train_and_evaluate(recipe_name: str, lr: float, seed: int, args: argparse.Namespace) -> dict:
    """Train one recipe at one learning rate from one seed on the task, then score it on
    that seed's held-out set."""
    device = torch.device(args.device)
    recipe = mmrec.recipes.load(recipe_name, task_overrides(args, lr))
    train = recipe.train
    torch.manual_seed(seed)
    model = mmrec.build(recipe).to(device)
    optimizer, use_aux = build_optimizer(model, train), getattr(recipe.model, "planning", None) is not None
    scheduler = build_scheduler(optimizer, train)
    forward = torch.compile(model) if args.compile else model
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    stream = examples(args, seed, device, args.train_pairs, args.train_min_gaps)
    history, loss_sum, diverged = [], torch.zeros((), device=device), False
    warmup = min(10, train.steps // 5)  # steps left out of tokens/s: compilation, allocator warm-up
    started, evaluating = time.perf_counter(), 0.0  # seconds of held-out scoring, left out of tokens/s
    for step in range(train.steps):
        if step == warmup:
            synchronize(device)
            started = time.perf_counter()
        inputs, targets, pairs = next(stream)
        positions, _ = query_gaps(inputs, targets, pairs)
        with autocast():
            out = forward(inputs, return_aux_loss=use_aux, return_state=False, logits_at=positions)
        logits = out.logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.gather(1, positions).flatten())
        (loss + out.aux_loss if use_aux else loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip or math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        if (step + 1) % args.log_every == 0 or step + 1 == train.steps:
            mean_loss = loss_sum.item() / ((step % args.log_every) + 1)
            loss_sum.zero_()
            print(f"{recipe_name} lr {lr:g} seed {seed} step {step + 1}: loss {mean_loss:.4f}", flush=True)
            if not math.isfinite(mean_loss):
                diverged = True
                break
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < train.steps:
            synchronize(device)
            paused = time.perf_counter()
            model.eval()
            scored = evaluate(forward, args, seed, device, autocast)
            history.append({"step": step + 1, **{k: v for k, v in scored.items() if k != "queries_by_gap"}})
            model.train()
            evaluating += time.perf_counter() - paused
    synchronize(device)
    timed, seconds = step + 1 - warmup, time.perf_counter() - started - evaluating
    row = {"parameters": model.num_parameters(), "steps": step + 1, "train_loss": mean_loss, "diverged": diverged,
           "tokens_per_s": timed * args.batch * args.seq_len / seconds if timed > 0 else None}
    model.eval()
    row.update(evaluate(forward, args, seed, device, autocast), state_bytes=state_bytes(recipe, args))
    if history:
        row["history"] = history
    return row


def run_one(recipe: str, lr: float, seed: int, args: argparse.Namespace) -> dict:
    """One (recipe, lr, seed) row; running out of memory is recorded, not raised."""
    return record([], {"recipe": recipe, "lr": lr, "seed": seed}, lambda: train_and_evaluate(recipe, lr, seed, args),
                  torch.device(args.device))


def mark_best(rows: list[dict]) -> None:
    """``best: true`` on the rows of each recipe's best rate: highest held-out accuracy, then
    lowest held-out loss, each averaged over the rate's seeds (a rate with a diverged or
    failed run never)."""
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        by_lr: dict[float, list[dict]] = {}
        for r in rows:
            if r["recipe"] == recipe:
                by_lr.setdefault(r["lr"], []).append(r)
        scored = {lr: runs for lr, runs in by_lr.items() if all("accuracy" in r and not r["diverged"] for r in runs)}

        def mean_score(lr: float) -> tuple[float, float]:
            runs = scored[lr]
            return sum(r["accuracy"] for r in runs) / len(runs), -sum(r["eval_loss"] for r in runs) / len(runs)

        best = max(scored, key=mean_score, default=None)
        for lr, runs in by_lr.items():
            for r in runs:
                r["best"] = lr == best


def print_table(rows: list[dict], meta: dict) -> None:
    print(f"\n{meta['device']}; MQAR: {meta['seq_len']} tokens, {meta['pairs']} pairs, vocabulary {meta['vocab_size']}, "
          f"min gap {meta['min_gap']}, {meta['steps']} steps of {meta['batch']}; gap buckets by chunk {meta['chunk']}")
    print(f"{'recipe':<24} {'params':>10} {'state B/seq':>12} {'lr':>8} {'seed':>5} {'accuracy':>9} "
          + " ".join(f"{b:>7}" for b in BUCKETS) + f" {'loss':>7} {'tokens/s':>10}")
    for r in rows:
        if "accuracy" not in r:
            print(f"  {r['recipe']:<22} {r['lr']:>33g} {r['seed']:>5} {r.get('error', 'failed')}")
            continue
        buckets = " ".join(f"{r['accuracy_by_gap'][b]:>7.3f}" if b in r["accuracy_by_gap"] else f"{'-':>7}" for b in BUCKETS)
        speed = f"{r['tokens_per_s']:>10.0f}" if r["tokens_per_s"] else f"{'-':>10}"
        print(f"{'*' if r['best'] else ' '} {r['recipe']:<22} {r['parameters']:>10,} {r['state_bytes']:>12,} {r['lr']:>8g} "
              f"{r['seed']:>5} {r['accuracy']:>9.3f} {buckets} {r['eval_loss']:>7.3f} {speed}"
              + ("  diverged" if r["diverged"] else ""))
    print("* best learning rate of the recipe (mean over its seeds)")
    if len(meta["seeds"]) > 1:
        for recipe in dict.fromkeys(r["recipe"] for r in rows):
            best = [r for r in rows if r["recipe"] == recipe and r["best"]]
            if best:
                accuracies = " / ".join(f"{r['accuracy']:.3f}" for r in best)
                passed = sum(r["accuracy"] >= RECALLED for r in best)
                print(f"{recipe} at lr {best[0]['lr']:g}: {accuracies} over seeds "
                      f"{', '.join(str(r['seed']) for r in best)}; {passed} of {len(best)} at {RECALLED:.0%} or more")


def run(args: argparse.Namespace) -> int:
    if args.seq_len is None:
        args.seq_len = 4096 if args.long_range else 256
    args.chunk = memory_chunk(args)
    if args.long_range:
        args.min_gap = 4 * args.chunk
    for pairs in {args.pairs, *(args.train_pairs or ())}:  # refuse a task that does not fit now
        for min_gap in {args.min_gap, *(args.train_min_gaps or ())}:
            mqar_batch(1, args.seq_len, pairs, args.vocab, args.power_a, min_gap)
    meta = {**run_metadata(), "task": "mqar", "seq_len": args.seq_len, "pairs": args.pairs,
            "train_pairs": args.train_pairs or [args.pairs], "train_min_gaps": args.train_min_gaps or [args.min_gap],
            "vocab_size": args.vocab,
            "power_a": args.power_a, "min_gap": args.min_gap, "chunk": args.chunk, "d_model": args.d_model,
            "n_layers": args.layers, "steps": args.steps, "batch": args.batch, "lrs": args.lrs,
            "eval_examples": math.ceil(args.eval_examples / args.batch) * args.batch, "seeds": args.seeds,
            "overrides": args.overrides, "compile": args.compile, "jobs": args.jobs,
            "autocast": "bfloat16" if torch.device(args.device).type == "cuda" else None}
    runs = [(recipe, lr, seed) for recipe in args.recipes for lr in args.lrs for seed in dict.fromkeys(args.seeds)]
    done = {}
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_one, *key, args): key for key in runs}
            for future in as_completed(futures):
                done[futures[future]] = future.result()
                write_json(args.out, {**meta, "complete": False, "results": list(done.values())})
    else:
        for key in runs:
            done[key] = run_one(*key, args)
            write_json(args.out, {**meta, "complete": False, "results": list(done.values())})
    rows = [done[key] for key in runs]
    mark_best(rows)
    print_table(rows, meta)
    payload = {**meta, "complete": True, "results": rows}
    write_json(args.out, payload)
    if args.plot:
        from mmrec.bench.plot import plot

        print(f"wrote {plot(payload, args.plot)}")
    return 0 if all("accuracy" in r for r in rows) else 1
