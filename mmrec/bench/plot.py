"""PNG charts of the length-dependent benchmarks, from their JSON (matplotlib).

- ``model``: training tokens/s and peak memory against sequence length, one line per recipe;
- ``decode``: decode tokens/s and peak memory against context length, one line per
  recipe, batch and mode;
- ``scan``: GB/s against sequence length, one line per implementation and pass;
- ``recall``: held-out accuracy against learning rate, one line per recipe (and seed), and
  each recipe's best runs' accuracy by gap bucket;
- ``scale``: validation loss against training tokens, one line per recipe, and each
  recipe's loss by position over its longest scored window.

``python -m mmrec.bench model --plot model.png`` (and ``recall``, ``scale``) draws after the run;
``python -m mmrec.bench plot model.json decode.json --out-dir charts`` draws from saved
results. Points a run could not measure (out of memory) are left out of their line.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def add_subcommand(commands) -> None:
    parser = commands.add_parser("plot", help="PNG charts from saved model / decode / scan / recall / scale JSON",
                                 description=__doc__)
    parser.add_argument("results", nargs="+", type=Path, help="JSON written by --out")
    parser.add_argument("--out-dir", type=Path, default=Path("."), help="where the PNGs go (named after the JSON)")
    parser.set_defaults(run=run)


def kind_of(payload: dict) -> str:
    """Which benchmark wrote ``payload``, from the fields of its rows."""
    rows = payload.get("results") or []
    keys = set().union(*(row.keys() for row in rows)) if rows else set()
    if {"context", "batch"} <= keys:
        return "decode"
    if {"impl", "pass", "GBps"} <= keys:
        return "scan"
    if {"recipe", "length", "tokens_per_s"} <= keys:
        return "model"
    if {"recipe", "lr", "accuracy_by_gap"} <= keys:
        return "recall"
    if {"recipe", "val_curve", "loss_by_position"} <= keys:
        return "scale"
    raise ValueError("nothing to plot: expected the JSON of `model`, `decode`, `scan`, `recall` or `scale`")


def _lines(rows: list[dict], label, x: str, y: str) -> dict[str, list[tuple]]:
    lines = defaultdict(list)
    for row in rows:
        if row.get(y) is not None:
            lines[label(row)].append((row[x], row[y]))
    return {name: sorted(points) for name, points in lines.items()}


def _draw(path: Path, title: str, xlabel: str, rows: list[dict], label, x: str,
          panels: list[tuple[str, str, bool]]) -> Path:
    """One panel per ``(ylabel, y field, log y)`` with a measured value; x on a log-2 scale."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display backend

    panels = [(ylabel, lines, log_y) for ylabel, y, log_y in panels if (lines := _lines(rows, label, x, y))]
    if not panels:
        raise ValueError(f"nothing measured to plot in {path.stem}")
    fig = Figure(figsize=(6 * len(panels), 4.5), layout="constrained")
    for axis, (ylabel, lines, log_y) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for name, points in lines.items():
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        axis.set_xscale("log", base=2)
        if log_y:
            axis.set_yscale("log")
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot(payload: dict, path: Path) -> Path:
    """Draw ``payload`` (the JSON of ``model``, ``decode``, ``scan``, ``recall`` or ``scale``) to the PNG ``path``."""
    kind, rows = kind_of(payload), payload["results"]
    title = f"{kind}: {payload.get('device', '?')}, {payload.get('date', '')}"
    if kind == "recall":
        return _draw_recall(path, title, payload)
    if kind == "scale":
        return _draw_scale(path, title, payload)
    memory = ("peak memory (GiB)", "peak_gib", False)
    if kind == "model":
        return _draw(path, title, "sequence length", rows, lambda r: r["recipe"], "length",
                     [("training tokens/s", "tokens_per_s", False), memory])
    if kind == "decode":
        label = lambda r: f"{r['recipe']} batch {r['batch']} {r.get('mode', '')}{'+compile' if r.get('compiled') else ''}"  # noqa: E731
        return _draw(path, title, "context length", rows, label, "context", [("decode tokens/s", "tokens_per_s", True), memory])
    return _draw(path, title, "sequence length", rows, lambda r: f"{r['impl']} {r['pass']}", "length",
                 [("GB/s at the byte floor", "GBps", True)])


def run(args: argparse.Namespace) -> int:
    for result in args.results:
        print(f"wrote {plot(json.loads(result.read_text()), args.out_dir / (result.stem + '.png'))}")
    return 0


def _draw_recall(path: Path, title: str, payload: dict) -> Path:
    from matplotlib.figure import Figure

    from mmrec.bench.recall import mark_best

    mark_best(payload["results"])  # also for the partial JSON of a run still going
    rows = [r for r in payload["results"] if "accuracy" in r]
    best = [r for r in rows if r["best"]]
    if not best:
        raise ValueError(f"nothing measured to plot in {path.stem}")
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    by_lr, by_gap = fig.subplots(1, 2)
    seeded = len({r.get("seed") for r in rows}) > 1  # one line per (recipe, seed)

    def label(r: dict) -> str:
        return f"{r['recipe']} seed {r['seed']}" if seeded else r["recipe"]

    for name, points in _lines(rows, label, "lr", "accuracy").items():
        by_lr.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    by_lr.set(xscale="log", xlabel="learning rate", ylabel="held-out accuracy", ylim=(0, 1.02))
    chunk, buckets = payload["chunk"], ["overall", "short", "medium", "long"]
    labels = ["overall", f"gap < {chunk}", f"gap {chunk}-{4 * chunk - 1}", f"gap >= {4 * chunk}"]
    width = 0.8 / len(best)
    for i, r in enumerate(best):
        heights = [r["accuracy"] if b == "overall" else r["accuracy_by_gap"].get(b, float("nan")) for b in buckets]
        by_gap.bar([j + i * width for j in range(len(buckets))], heights, width, label=f"{label(r)} (lr {r['lr']:g})")
    by_gap.set_xticks([j + width * (len(best) - 1) / 2 for j in range(len(buckets))], labels, fontsize="small")
    by_gap.set(ylabel="held-out accuracy, best lr", ylim=(0, 1.02))
    for axis in (by_lr, by_gap):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    fig.suptitle(f"{title}\nMQAR: {payload.get('seq_len')} tokens, {payload.get('pairs')} pairs, min gap {payload.get('min_gap')}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _draw_scale(path: Path, title: str, payload: dict) -> Path:
    from matplotlib.figure import Figure

    rows = [r for r in payload["results"] if r.get("val_curve") or r.get("loss_by_position")]
    if not rows:
        raise ValueError(f"nothing measured to plot in {path.stem}")
    seq_len = payload["seq_len"]
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    curves, by_position = fig.subplots(1, 2)
    for r in rows:
        points = [(p["tokens"], p["val_loss"]) for p in r.get("val_curve", []) if p["val_loss"] is not None]
        curves.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=r["recipe"])
        scored = [e for e in r.get("loss_by_position", []) if "bucket_loss" in e]
        if scored:
            longest = max(scored, key=lambda e: e["length"])
            width = longest["bucket_tokens"]
            centres = [min((i + 0.5) * width, longest["length"]) for i in range(len(longest["bucket_loss"]))]
            by_position.plot(centres, longest["bucket_loss"], label=f"{r['recipe']} ({longest['multiple']}x window)")
    curves.set(xlabel="training tokens", ylabel="validation loss")
    by_position.axvline(seq_len, color="gray", linestyle=":", label=f"training length {seq_len}")
    by_position.set_xscale("log", base=2)
    by_position.set(xlabel="position in the window (tokens)", ylabel="mean loss at the position")
    for axis in (curves, by_position):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    fig.suptitle(f"{title}\n{payload.get('tokens', 0):,} training tokens from {payload.get('data', '?')}, "
                 f"{payload.get('eval_windows')} validation windows a length")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
