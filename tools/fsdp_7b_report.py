"""Summaries and verdicts for ``tools/fsdp_7b.sh``, from the runs' ``metrics.jsonl``.

    python tools/fsdp_7b_report.py summary RUN/metrics.jsonl --processes 2 --skip 5 --out s.json [--curve]
    python tools/fsdp_7b_report.py resume --reference B --fresh A --resumed C --other D --at 4 --out ckpt.json
    python tools/fsdp_7b_report.py plot real.json --out real.png

``summary``: tokens/s and MFU over the steps after the first ``--skip`` (which compile),
weighted by time; peak memory per GPU; the losses. ``resume``: whether runs resumed from
the checkpoint of step ``--at`` reproduce the uninterrupted run's losses of the steps after
it; exit status 1 when one does not. ``plot``: the loss curve of a ``summary --curve``
JSON (matplotlib). Standard library only, but for ``plot``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(records: list[dict], key: str = "train_loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r}


# --------------------------------------------------------------------------- summary


def summarise(records: list[dict], processes: int, skip: int) -> dict:
    steps = [r for r in records if "train_loss" in r]
    if not steps:
        raise SystemExit("no training step finished: see the log")
    timed = steps[skip:] if len(steps) > skip else steps
    seconds = sum(r["train_step_s"] for r in timed)
    tokens = sum(r["train_step_s"] * r["train_tokens_per_s"] for r in timed)
    summary = {
        "processes": processes, "steps": len(steps), "steps_timed": len(timed), "first_timed_step": timed[0]["step"],
        "tokens_per_s": tokens / seconds, "s_per_step": seconds / len(timed),
        "first_step_s": steps[0]["train_step_s"],
        "loss_first": steps[0]["train_loss"], "loss_last": steps[-1]["train_loss"],
        "loss_min": min(r["train_loss"] for r in steps),
    }
    if "train_mfu" in timed[0]:  # per step MFU is linear in tokens/s: weight by time
        summary["mfu"] = sum(r["train_mfu"] * r["train_step_s"] for r in timed) / seconds
    if "train_peak_gib" in steps[-1]:
        summary["peak_gib_per_gpu"] = steps[-1]["train_peak_gib"]
        summary["peak_reserved_gib_per_gpu"] = steps[-1]["train_peak_reserved_gib"]
    events = [r for r in records if r.get("event") == "throughput"]
    if events:
        summary["trainer_summary"] = events[-1]  # the trainer's own, over all but its first 3 steps
    val = [r["val_loss"] for r in records if "val_loss" in r]
    if val:
        summary["val_loss"] = val[-1]
    return summary


def describe(summary: dict, label: str) -> str:
    mfu = f", MFU {100 * summary['mfu']:.1f}%" if "mfu" in summary else ""
    mem = (", peak memory per GPU " + " / ".join(f"{g:.1f}" for g in summary["peak_gib_per_gpu"]) + " GiB"
           if "peak_gib_per_gpu" in summary else "")
    return (f"{label}{summary['processes']} processes: {summary['tokens_per_s']:,.0f} tokens/s over steps "
            f"{summary['first_timed_step']}-{summary['first_timed_step'] + summary['steps_timed'] - 1}{mfu}{mem}; "
            f"loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}")


def cmd_summary(args) -> int:
    records = read_metrics(args.metrics)
    summary = summarise(records, args.processes, args.skip)
    if args.curve:  # the loss curve: every step's training loss and rate, every validation
        summary["train_loss"] = [[r["step"], r["train_loss"]] for r in records if "train_loss" in r]
        summary["train_lr"] = [[r["step"], r["train_lr"]] for r in records if "train_lr" in r]
        summary["val_loss_by_step"] = [[r["step"], r["val_loss"]] for r in records if "val_loss" in r]
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print("\nloss by step: " + " ".join(f"{r['train_loss']:.3f}" for r in records if "train_loss" in r))
    shown = {k: v for k, v in summary.items() if k not in ("train_loss", "train_lr", "val_loss_by_step")}
    print(json.dumps(shown, indent=1))
    print(describe(summary, f"{args.label}: " if args.label else ""))
    return 0


# --------------------------------------------------------------------------- resume


def compare(reference: dict[int, float], other: dict[int, float], steps: list[int]) -> dict:
    """The largest absolute and relative difference of ``other``'s losses from
    ``reference``'s over ``steps`` (both must have every one)."""
    missing = [s for s in steps if s not in reference or s not in other]
    if missing or not steps:
        return {"steps": steps, "missing_steps": missing or ["none run"]}
    diffs = {s: other[s] - reference[s] for s in steps}
    worst = max(steps, key=lambda s: abs(diffs[s]))
    return {"steps": steps, "identical": all(d == 0 for d in diffs.values()),
            "max_abs_diff": abs(diffs[worst]), "max_rel_diff": abs(diffs[worst]) / abs(reference[worst]),
            "reference": [reference[s] for s in steps], "got": [other[s] for s in steps]}


def verdict(name: str, result: dict, rtol: float) -> tuple[bool, str]:
    if "missing_steps" in result:
        return False, f"FAIL {name}: no loss for steps {result['missing_steps']} (see the log)"
    ok = result["max_rel_diff"] <= rtol
    pairs = ", ".join(f"{s}: {a:.6f} / {b:.6f}" for s, a, b in zip(result["steps"], result["reference"], result["got"]))
    how = "bitwise identical" if result["identical"] else (
        f"max |diff| {result['max_abs_diff']:.3g} (relative {result['max_rel_diff']:.3g}, tolerance {rtol:g})")
    return ok, f"{'PASS' if ok else 'FAIL'} {name}: {how}; step: uninterrupted / resumed loss: {pairs}"


def cmd_resume(args) -> int:
    if args.resumed is None and args.other is None:
        raise SystemExit("nothing to compare: give --resumed, --other or both")
    reference_records = read_metrics(args.reference / "metrics.jsonl")
    reference = losses(reference_records)
    report = {"checkpoint_step": args.at, "rtol": args.rtol, "rtol_other": args.rtol_other}
    if args.fresh is not None:  # context: how closely two runs from scratch agree (the run that saved, up to it)
        fresh = losses(read_metrics(args.fresh / "metrics.jsonl"))
        report["from_scratch"] = compare(reference, fresh, list(range(1, args.at + 1)))
        fs = report["from_scratch"]
        print(f"two runs from scratch, steps 1-{args.at}: " + (
            f"no loss for steps {fs['missing_steps']}" if "missing_steps" in fs
            else "bitwise identical" if fs["identical"] else f"max relative difference {fs['max_rel_diff']:.3g}"))
    checks = []
    if args.resumed is not None:
        resumed_records = read_metrics(args.resumed / "metrics.jsonl")
        after = sorted(s for s in reference if s > args.at)
        report["resumed"] = compare(reference, losses(resumed_records), after)
        span = f" (steps {after[0]}-{after[-1]})" if after else ""
        checks.append(verdict(f"resume on {args.processes} processes{span}", report["resumed"], args.rtol))
        ref_val, res_val = losses(reference_records, "val_loss"), losses(resumed_records, "val_loss")
        if set(ref_val) & set(res_val):
            report["resumed_val"] = compare(ref_val, res_val, sorted(set(ref_val) & set(res_val)))
            checks.append(verdict(f"validation loss after the resume on {args.processes} processes",
                                  report["resumed_val"], args.rtol))
    if args.other is not None:
        steps = list(range(args.at + 1, args.other_until + 1))
        report["other"] = compare(reference, losses(read_metrics(args.other / "metrics.jsonl")), steps)
        report["other_processes"] = args.other_processes
        checks.append(verdict(f"resume on {args.other_processes} process(es), another count than saved (steps "
                              f"{steps[0]}-{steps[-1]})", report["other"], args.rtol_other))
    for ok, line in checks:
        print(line)
    report["pass"] = all(ok for ok, _ in checks)
    report["verdicts"] = [line for _, line in checks]
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"checkpoint resume: {'PASS' if report['pass'] else 'FAIL'}")
    return 0 if report["pass"] else 1


# --------------------------------------------------------------------------- plot


def cmd_plot(args) -> int:
    try:
        from matplotlib.figure import Figure  # no pyplot: no display backend needed
    except ImportError:
        print(f"no matplotlib here: draw it where there is one: python {sys.argv[0]} plot {args.summary} --out PNG")
        return 0
    summary = json.loads(args.summary.read_text())
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    train = summary["train_loss"]
    ax.plot([s for s, _ in train], [v for _, v in train], label="training loss (one batch)", lw=1)
    if summary.get("val_loss_by_step"):
        val = summary["val_loss_by_step"]
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(args.title or args.summary.stem)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fsdp_7b_report.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(required=True)
    s = sub.add_parser("summary", help="throughput, memory and losses of one run")
    s.add_argument("metrics", type=Path)
    s.add_argument("--processes", type=int, required=True)
    s.add_argument("--skip", type=int, default=5, help="leave out the first steps (compilation)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--label", default="")
    s.add_argument("--curve", action="store_true", help="keep every step's loss and rate, and every validation")
    s.set_defaults(run=cmd_summary)
    r = sub.add_parser("resume", help="resumed runs against the uninterrupted one")
    r.add_argument("--reference", type=Path, required=True, help="run folder of the uninterrupted run")
    r.add_argument("--fresh", type=Path, help="run folder of the run that saved the checkpoint")
    r.add_argument("--resumed", type=Path, help="run folder resumed on as many processes as saved")
    r.add_argument("--processes", type=int, help="how many processes saved (and resumed into --resumed)")
    r.add_argument("--other", type=Path, help="run folder resumed on another number of processes")
    r.add_argument("--other-processes", type=int)
    r.add_argument("--other-until", type=int, help="the last step --other was to train")
    r.add_argument("--at", type=int, required=True, help="the checkpoint's step")
    r.add_argument("--rtol", type=float, required=True)
    r.add_argument("--rtol-other", type=float, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.set_defaults(run=cmd_resume)
    g = sub.add_parser("plot", help="the loss curve of a summary written with --curve")
    g.add_argument("summary", type=Path)
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--title")
    g.set_defaults(run=cmd_plot)
    args = p.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
