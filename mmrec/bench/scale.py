"""Quality at scale: MM-Rec against the Transformer of its size, trained on the same
tokens in the same order from token shards, and scored past the training length::

    python -m mmrec.data.prepare --input TEXTS --out data/corpus-32k
    python -m mmrec.bench scale --data data/corpus-32k --tokens 50_000_000 \\
        --set train.compile=true --set train.warmup_steps=100 --out scale.json --plot scale.png

**Training.** Each of ``--recipes`` (default ``small`` and ``transformer-small``) trains
with ``python -m mmrec.recipes.train --data DIR`` for ``ceil(tokens / (batch_size x
seq_len x grad_accum))`` updates (``train.steps``: the cosine schedule ends there), side by
side on the device or one after the other (``--sequential``), each with ``--set``'s
overrides. Validation runs every ``steps / --evals`` updates (``train.eval_every``, unless
``--set`` gives it) on the run's fixed ``train.eval_batches`` batches of the shards'
validation split: the curves. Only the last checkpoint is saved (``train.save_every``,
unless given). ``train.warmup_steps`` is the recipe's (2,000 for ``small``): at small
budgets set it lower, or the rate never reaches ``train.lr``.

**The same batches.** Update ``s`` trains on samples ``s x grad_accum x batch_size`` to
``(s + 1) x grad_accum x batch_size - 1`` of the training stream, and sample ``i`` is a
function of the shards' tokens, ``train.seq_len``, ``train.seed`` and ``i`` alone
(:class:`mmrec.data.TokenStream`): neither the model nor anything the run did before
decides it. Recipes that agree on ``seq_len``, ``batch_size``, ``grad_accum`` and ``seed``
therefore see the same tokens in the same order; recipes that do not are refused before
any training. Each result records what its checkpoint says it trained on (the shards'
fingerprint, the seed, the tokens seen) and ``read``, a digest of the CRC-32 of every
update's input tokens that the trainer logged as it read them (``train_batch_crc``; under
``torchrun``, the main process's share of each batch);
``same_batches`` says whether every run agrees (``null`` when a log lacks the CRCs).

**Loss by position.** Each final checkpoint, in float32, scores ``--eval-windows``
windows of the validation split for each of ``--lengths`` (multiples of the training
``seq_len``), spread evenly over the split (the same windows for every model), each in
one forward pass: an MM-Rec model streams its state through the window, the Transformer
attends over all of it with rotary positions it never saw in training (past
``LanguageModel.stream_piece`` tokens the model runs in pieces carrying its state, which
equals one pass). The per-token cross-entropy, averaged over the windows, is reported in
buckets of ``seq_len / 8`` positions and as its mean over the segments 0-1x, 1-2x,
2-4x, 4-8x, ... of the training length: a loss that keeps falling past 1x uses the longer
context, one that rises does not extrapolate. Each window begins a validation document
and stays inside it (the documents long enough, spread evenly; fewer than
``--eval-windows`` when fewer are that long), so a position is the context that document
has given. ``--stream-windows`` spreads the windows over the validation stream instead,
where a long window spans several documents (site-packages files average about 4,000
tokens). A length a model cannot run (out of memory, a positional scheme with a hard
limit, no document that long) is recorded with the reason instead.

**Data time.** The trainer logs ``train_data_s``, the seconds each update spent reading
its batch, beside ``train_step_s``: the result gives the median of each and the share of
the training time spent reading.

**Loss noise.** ``train_loss_noise`` is the training loss's spread from step to step
(:func:`loss_noise`): what the seeds ask of the planning loss besides its validation loss.

``--plot PNG`` draws the validation curves and the loss by position; ``python -m
mmrec.bench plot scale.json`` draws them from the JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import mmrec
from mmrec.bench.common import (
    is_out_of_memory,
    reset_peak_memory,
    run_metadata,
    write_json,
)
from mmrec.bench.quality import (
    load_trained,
    read_metrics,
    read_records,
    train_all,
    train_command,
)
from mmrec.checkpoint import Checkpoint
from mmrec.data import DataError, TensorTokens, TokenSource, TokenStream
from mmrec.data.shards import is_shard_folder, open_shards
from mmrec.recipes import RecipeError
from mmrec.recipes.checkpointing import holds_a_run

# what decides the training batches besides the data (module docstring)
BATCH_FIELDS = ("seq_len", "batch_size", "grad_accum", "seed")


class ScaleError(ValueError):
    """Options the benchmark cannot run with."""


def add_subcommand(commands) -> None:
    parser = commands.add_parser("scale", help="MM-Rec vs the Transformer on token shards: curves, loss by position",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a folder of token shards (python -m mmrec.data.prepare)")
    parser.add_argument("--recipes", nargs="+", default=["small", "transformer-small"])
    parser.add_argument("--tokens", type=int, required=True, help="training tokens per model, e.g. 50_000_000")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override applied to every recipe, e.g. --set train.compile=true")
    parser.add_argument("--evals", type=int, default=20, help="validation points along each curve (default 20)")
    parser.add_argument("--runs", type=Path, default=Path("runs/scale"), help="folder for the training runs")
    parser.add_argument("--sequential", action="store_true", help="train one recipe after the other instead of side by side")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 4, 8],
                        help="windows scored by position, in multiples of train.seq_len (default 1 4 8)")
    parser.add_argument("--eval-windows", type=int, default=16, help="validation windows per length (default 16)")
    parser.add_argument("--stream-windows", action="store_true",
                        help="score windows spread over the validation stream, across documents (default: each "
                             "window inside one document, from its start)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also draw the curves (matplotlib)")
    parser.set_defaults(run=run)


# --------------------------------------------------------------------------- the runs


def _overridden(overrides: list[str], field: str) -> bool:
    return any(o.split("=", 1)[0].strip() == field for o in overrides)


def plan_runs(args: argparse.Namespace) -> tuple[dict[str, list[str]], dict]:
    """Each recipe's overrides (``--set``'s, then what ``--tokens`` and ``--evals`` make of
    them) and the batch settings they all share; bad options are refused here, before any
    training."""
    if args.tokens < 1 or args.evals < 1 or args.eval_windows < 1 or min(args.lengths) < 1:
        raise ScaleError("--tokens, --evals, --eval-windows and every --lengths must be at least 1")
    if _overridden(args.overrides, "train.steps"):
        raise ScaleError("--tokens sets train.steps: leave it out of --set")
    names = [Path(r).stem for r in args.recipes]  # a shipped name, or a recipe file
    if len(set(names)) < len(names):
        raise ScaleError(f"two recipes would share a run folder ({', '.join(names)}): give each a distinct name")
    trains = {recipe: mmrec.recipes.load(recipe, args.overrides).train for recipe in args.recipes}
    settings = {recipe: {f: getattr(t, f) for f in BATCH_FIELDS} for recipe, t in trains.items()}
    first = next(iter(settings.values()))
    if any(s != first for s in settings.values()):
        table = "; ".join(f"{r}: {s}" for r, s in settings.items())
        raise ScaleError(f"the recipes would train on different batches ({table}): make "
                         f"{', '.join('train.' + f for f in BATCH_FIELDS)} equal with --set")
    tokens_per_step = first["batch_size"] * first["seq_len"] * first["grad_accum"]
    steps = math.ceil(args.tokens / tokens_per_step)
    made = [f"train.steps={steps}"]
    if not _overridden(args.overrides, "train.eval_every"):
        made.append(f"train.eval_every={max(1, steps // args.evals)}")
    if not _overridden(args.overrides, "train.save_every"):
        made.append(f"train.save_every={steps}")
    for recipe, train in trains.items():
        if train.warmup_steps >= steps:
            print(f"warning: {recipe}: train.warmup_steps = {train.warmup_steps} is not below the {steps} steps of "
                  f"--tokens {args.tokens:,}: the rate never reaches train.lr (--set train.warmup_steps=N)",
                  file=sys.stderr)
    return ({recipe: [*args.overrides, *made] for recipe in args.recipes},
            {**first, "steps": steps, "tokens_per_step": tokens_per_step, "tokens": steps * tokens_per_step})


def read_batches(steps: list[dict]) -> str | None:
    """A digest of the batches a run read, from the CRC-32 the trainer logs for each update
    (``train_batch_crc``), in step order; ``None`` when its log lacks any of them."""
    by_step = {r["step"]: r for r in steps}  # a step logged twice (an older resumed log): its last record
    crcs = [by_step[step].get("train_batch_crc") for step in sorted(by_step)]
    if not crcs or None in crcs:
        return None
    return hashlib.blake2b(" ".join(crcs).encode(), digest_size=8).hexdigest()


def loss_noise(losses: list[float], window: int = 11) -> float | None:
    """The training loss's spread from step to step: the standard deviation of each step's
    loss around the mean of the ``window`` steps centred on it, over the second half of the
    run (past the steep start, so the trend the mean removes is nearly straight). ``None``
    for runs too short to have a full window there."""
    half = len(losses) // 2
    if len(losses) - half < window:
        return None
    t = torch.tensor(losses, dtype=torch.float64)
    trend = t.unfold(0, window, 1).mean(1)  # trend[i]: mean of steps i .. i + window - 1
    centre = window // 2
    residual = t[centre : centre + trend.numel()] - trend
    return float(residual[max(0, half - centre):].std())


def describe_run(run_dir: Path, checkpoint: Checkpoint) -> dict:
    """What a finished run's log and final checkpoint say: its validation curve, speed,
    data time, and the batches it trained on."""
    records = read_records(run_dir)
    train = mmrec.recipes.load(str(checkpoint.recipe_file)).train
    data = checkpoint.trainer_state()["data"]
    tokens_per_step = train.batch_size * train.seq_len * train.grad_accum
    steps = [r for r in records if "train_loss" in r]
    row = {
        "step": checkpoint.step,
        "val_curve": [{"step": r["step"], "tokens": r["step"] * tokens_per_step, "val_loss": r["val_loss"]}
                      for r in records if "val_loss" in r],
        **read_metrics(run_dir),
        "batches": {"fingerprint": data["fingerprint"], "seed": data["seed"], "tokens_seen": data["tokens_seen"],
                    **{f: getattr(train, f) for f in BATCH_FIELDS},
                    "read": read_batches(steps)},
    }
    by_step = {r["step"]: r["train_loss"] for r in steps}  # a step logged twice (resumed): its last record
    row["train_loss_noise"] = loss_noise([by_step[step] for step in sorted(by_step)])
    timed = steps[len(steps) // 10 :]  # past the compile and warm-up steps
    if timed and all("train_data_s" in r for r in timed):
        data_s = sorted(r["train_data_s"] for r in timed)
        step_s = sorted(r["train_step_s"] for r in timed)
        row["data_time"] = {"median_data_s": data_s[len(data_s) // 2], "median_step_s": step_s[len(step_s) // 2],
                            "data_share": sum(data_s) / sum(step_s)}
    else:
        row["data_time"] = None  # a trainer that does not log train_data_s
    return row


# --------------------------------------------------------------------------- loss by position


def segments(multiple: int) -> list[tuple[int, int]]:
    """The segments of a window of ``multiple`` training lengths, in training lengths:
    ``(0, 1), (1, 2), (2, 4), (4, 8), ...``, the last cut at ``multiple``."""
    edges = [0, 1]
    while edges[-1] < multiple:
        edges.append(min(2 * edges[-1], multiple))
    return list(itertools.pairwise(edges))


@torch.no_grad()
def mean_token_loss(model: mmrec.LanguageModel, windows: torch.Tensor, device: str) -> torch.Tensor:
    """The cross-entropy (float32) at each position of ``windows`` ``[K, length + 1]``,
    averaged over the K windows: ``[length]`` float64. One window at a time, each in one
    forward pass."""
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64, device=device)
    for window in windows.to(device):
        logits = model(window[None, :-1], return_state=False).logits[0]  # [length, vocab]
        total += F.cross_entropy(logits.float(), window[1:], reduction="none").double()
        del logits
    return (total / windows.shape[0]).cpu()


def document_ends(tokens: TokenSource, eod_id: int, piece: int = 1 << 22) -> torch.Tensor:
    """Positions of the end-of-document tokens, read ``piece`` tokens at a time, so that a
    long validation split is never held whole."""
    n = tokens.numel()
    found = [tokens.windows(torch.tensor([start]), min(piece, n - start))[0].eq(eod_id).nonzero().flatten() + start
             for start in range(0, n, piece)]
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)


def document_window_starts(tokens: torch.Tensor | TokenSource, eod_id: int, length: int, count: int,
                           piece: int = 1 << 22, ends: torch.Tensor | None = None) -> torch.Tensor:
    """Starts of up to ``count`` windows of ``length + 1`` tokens (inputs and the last
    target) that each begin a document and stay inside it (its end-of-document token may be
    the last target), spread evenly over the documents long enough for one. ``ends``: the
    split's :func:`document_ends`, when already found."""
    tokens = TensorTokens(tokens) if isinstance(tokens, torch.Tensor) else tokens
    n = tokens.numel()
    ends = document_ends(tokens, eod_id, piece) if ends is None else ends  # each document's end-of-document token
    if n and (not ends.numel() or ends[-1] != n - 1):  # a last document without one ends with the split
        ends = torch.cat([ends, ends.new_tensor([n - 1])])
    if not ends.numel():
        return ends
    starts = torch.cat([ends.new_zeros(1), ends[:-1] + 1])
    long_enough = starts[ends - starts >= length]
    if long_enough.numel() <= count:
        return long_enough
    return long_enough[torch.linspace(0, long_enough.numel() - 1, count, dtype=torch.float64).round().long()]


def loss_by_position(model: mmrec.LanguageModel, val_tokens: TokenSource, seq_len: int, multiples: list[int],
                     num_windows: int, device: str, eod_id: int | None = None) -> list[dict]:
    """Per multiple of ``seq_len``: the mean loss by position bucket (``seq_len / 8``
    positions each) and by segment (:func:`segments`) over ``num_windows`` validation
    windows; or ``error``, why that length could not be scored. With ``eod_id`` each window
    lies inside one document, from its start (:func:`document_window_starts`), so a position
    is the context the document itself has given; without, windows are spread evenly over
    the validation stream and may span documents."""
    bucket = max(1, seq_len // 8)
    ends = document_ends(val_tokens, eod_id) if eod_id is not None else None  # read once, for every length
    rows = []
    for multiple in multiples:
        length = multiple * seq_len
        row = {"multiple": multiple, "length": length, "windows": num_windows, "bucket_tokens": bucket,
               "window_starts": "documents" if eod_id is not None else "stream"}
        if eod_id is not None:
            starts = document_window_starts(val_tokens, eod_id, length, num_windows, ends=ends)
            row["windows"] = starts.numel()
            if not starts.numel():
                row["error"] = (f"no validation document has the {length + 1:,} tokens of a window "
                                "(--stream-windows scores windows that span documents)")
                rows.append(row)
                continue
            windows = val_tokens.windows(starts, length + 1)
        elif val_tokens.numel() < length + 1:
            row["error"] = f"the validation split has {val_tokens.numel():,} tokens, fewer than a window's {length + 1:,}"
            rows.append(row)
            continue
        else:
            [(inputs, targets)] = TokenStream(val_tokens, length, 0, "validation").fixed_batches(1, num_windows)
            windows = torch.cat([inputs, targets[:, -1:]], dim=1)  # [K, length + 1]
            row["overlapping"] = num_windows * length > val_tokens.numel() - 1  # windows share tokens
        try:
            per_token = mean_token_loss(model, windows, device)
        except (RuntimeError, ValueError, IndexError) as error:  # out of memory, or a length the model refuses
            row["error"] = "out of memory" if is_out_of_memory(error) else f"{type(error).__name__}: {error}"
        else:
            row["bucket_loss"] = [float(b.mean()) for b in per_token.split(bucket)]
            row["segment_loss"] = {f"{a}-{b}x": float(per_token[a * seq_len : b * seq_len].mean())
                                   for a, b in segments(multiple)}
        reset_peak_memory(torch.device(device))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the benchmark


def run(args: argparse.Namespace) -> int:
    try:
        if not is_shard_folder(args.data):
            raise ScaleError(f"{args.data} is not a folder of token shards (no index.json): make one with python -m "
                             f"mmrec.data.prepare --input TEXT --out DIR (the quality benchmark trains on text)")
        shards = open_shards(args.data)
        plan, shared = plan_runs(args)
        taken = [args.runs / Path(r).stem for r in args.recipes if holds_a_run(args.runs / Path(r).stem)]
        if taken:
            raise ScaleError(f"{', '.join(map(str, taken))} already hold a run: delete them or choose another --runs")
    except (ScaleError, DataError, RecipeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    meta = {**run_metadata(), "data": args.data, "data_fingerprint": shards.fingerprint, "overrides": args.overrides,
            **shared, "lengths": args.lengths, "eval_windows": args.eval_windows,
            "val_tokens": shards.val.numel(), "side_by_side": not args.sequential}
    print(f"{', '.join(args.recipes)}: {shared['steps']} steps of {shared['tokens_per_step']:,} tokens "
          f"({shared['tokens']:,} tokens) each, on {args.data}", flush=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    commands = {recipe: (train_command(recipe, args.data, args.runs / Path(recipe).stem, args.device, plan[recipe]),
                         args.runs / f"{Path(recipe).stem}.log") for recipe in args.recipes}
    rows = []
    for recipe, exit_code, wall_s in train_all(commands, args.sequential):
        run_dir = args.runs / Path(recipe).stem
        row = {"recipe": recipe, "exit_code": exit_code, "wall_s": wall_s}
        if exit_code == 0:
            checkpoint, model = load_trained(run_dir, args.device)
            row.update(describe_run(run_dir, checkpoint), parameters=model.num_parameters())
            row["loss_by_position"] = loss_by_position(model, shards.val, shared["seq_len"], args.lengths,
                                                       args.eval_windows, args.device,
                                                       None if args.stream_windows else shards.eod_id)
            del model
            reset_peak_memory(torch.device(args.device))  # the next model scored has the memory to itself
        else:
            print(f"{recipe}: training failed (exit {exit_code}); see {run_dir}.log", file=sys.stderr)
        rows.append(row)
        print({k: v for k, v in row.items() if k not in ("val_curve", "loss_by_position")}, flush=True)
        if len(rows) < len(commands):  # scored as each finishes: a run cut short keeps the finished ones
            write_json(args.out, {**meta, "complete": False, "same_batches": None, "results": rows})
    trained = [r for r in rows if r["exit_code"] == 0]
    same = (all(r["batches"] == trained[0]["batches"] for r in trained)
            if trained and all(r["batches"]["read"] for r in trained) else None)
    payload = {**meta, "complete": True, "same_batches": same, "results": rows}
    print_table(payload)
    write_json(args.out, payload)
    if args.plot and trained:
        from mmrec.bench.plot import plot

        print(f"wrote {plot(payload, args.plot)}")
    return 0 if len(trained) == len(rows) and same else 1


def print_table(payload: dict) -> None:
    rows = payload["results"]
    print(f"\n{payload['device']}; data {payload['data']}; {payload['tokens']:,} training tokens, "
          f"{payload['steps']} steps of {payload['batch_size']} x {payload['seq_len']}; "
          f"overrides {payload['overrides'] or 'none'}; same batches: {payload['same_batches']}")
    print(f"{'recipe':<24} {'params':>12} {'val loss':>9} {'loss noise':>10} {'tokens/s':>10} {'data s/step':>12} "
          f"{'data share':>11}")
    for r in rows:
        if r["exit_code"] != 0:
            print(f"{r['recipe']:<24} failed")
            continue
        data = r["data_time"]
        data_cols = (f"{data['median_data_s']:>12.2e} {data['data_share']:>11.1%}" if data
                     else f"{'not logged':>12} {'-':>11}")
        noise = r.get("train_loss_noise")
        print(f"{r['recipe']:<24} {r['parameters']:>12,} {r['last_val_loss'] or float('nan'):>9.4f} "
              f"{noise if noise is not None else float('nan'):>10.4f} {r['median_tokens_per_s'] or 0:>10.0f} {data_cols}")
    labels = list(dict.fromkeys(f"{a}-{b}x" for m in payload["lengths"] for a, b in segments(m)))
    print(f"\nmean validation loss by position, in multiples of the training length {payload['seq_len']}")
    print(f"{'recipe':<24} {'window/n':>8} " + " ".join(f"{label:>9}" for label in labels))
    for r in rows:
        for entry in r.get("loss_by_position", []):
            window = f"{entry['multiple']}x/{entry['windows']}"
            if "error" in entry:
                print(f"{r['recipe']:<24} {window:>8} not evaluable: {entry['error']}")
                continue
            cells = [entry["segment_loss"].get(label) for label in labels]
            print(f"{r['recipe']:<24} {window:>8} " + " ".join(f"{c:>9.4f}" if c is not None else f"{'-':>9}" for c in cells))
