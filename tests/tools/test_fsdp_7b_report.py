"""The verdicts and summaries of ``tools/fsdp_7b.sh`` (its dry run, on two gloo
processes, is ``tests/recipes/test_distributed.py``'s and the script's own check)."""

import json

import pytest

from tools.fsdp_7b_report import main


def write_run(folder, losses: dict[int, float], val: dict[int, float] | None = None, seconds: float = 1.0):
    folder.mkdir()
    records = [{"step": s, "train_loss": v, "train_lr": 1e-4, "train_step_s": seconds, "train_tokens_per_s": 100 / seconds}
               for s, v in losses.items()]
    records += [{"step": s, "val_loss": v} for s, v in (val or {}).items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


LOSSES = {1: 10.5, 2: 9.25, 3: 8.0, 4: 7.125, 5: 6.5, 6: 6.0}


def resume(tmp_path, resumed: dict, other: dict, rtol="1e-4"):
    tmp_path.mkdir(exist_ok=True)
    b = write_run(tmp_path / "b", LOSSES, {6: 5.5})
    a = write_run(tmp_path / "a", {s: LOSSES[s] for s in (1, 2, 3)})
    c = write_run(tmp_path / "c", resumed, {6: 5.5} if 6 in resumed else None)
    d = write_run(tmp_path / "d", other)
    out = tmp_path / "ckpt.json"
    code = main(["resume", "--reference", str(b), "--fresh", str(a), "--resumed", str(c), "--processes", "2",
                 "--other", str(d), "--other-processes", "1", "--other-until", "5", "--at", "3", "--rtol", rtol, "--rtol-other", "1e-2",
                 "--out", str(out)])
    return code, json.loads(out.read_text())


def test_resumed_runs_that_match_pass(tmp_path, capsys):
    other = {4: 7.125 * (1 + 3e-3), 5: 6.5 * (1 - 5e-3)}  # another process count: rounding apart
    code, report = resume(tmp_path, {s: LOSSES[s] for s in (4, 5, 6)}, other)
    text = capsys.readouterr().out
    assert code == 0 and report["pass"]
    assert "two runs from scratch, steps 1-3: bitwise identical" in text
    assert "PASS resume on 2 processes (steps 4-6): bitwise identical" in text
    assert report["other"]["max_rel_diff"] == pytest.approx(5e-3) and not report["other"]["identical"]
    assert "PASS resume on 1 process(es)" in text and text.rstrip().endswith("checkpoint resume: PASS")


def test_a_resumed_loss_out_of_tolerance_fails(tmp_path, capsys):
    resumed = {4: 7.125, 5: 6.5 * (1 + 2e-4), 6: 6.0}
    code, report = resume(tmp_path, resumed, {4: 7.125, 5: 6.5})
    text = capsys.readouterr().out
    assert code == 1 and not report["pass"]
    assert report["resumed"]["max_rel_diff"] == pytest.approx(2e-4)
    assert "FAIL resume on 2 processes (steps 4-6): max |diff| 0.0013" in text and "5: 6.500000 / 6.501300" in text
    # the same numbers pass a looser tolerance
    code, report = resume(tmp_path / "loose", resumed, {4: 7.125, 5: 6.5}, rtol="1e-3")
    assert code == 0 and report["pass"]


def test_a_resume_that_stopped_early_fails(tmp_path, capsys):
    code, report = resume(tmp_path, {4: 7.125, 5: 6.5}, {})  # step 6 missing; the other count ran nothing
    text = capsys.readouterr().out
    assert code == 1
    assert report["resumed"]["missing_steps"] == [6] and "FAIL resume on 2 processes (steps 4-6): no loss for steps [6]" in text
    assert "FAIL resume on 1 process(es), another count than saved (steps 4-5): no loss for steps [4, 5]" in text


def test_summary_weights_by_time_and_keeps_the_curve(tmp_path, capsys):
    run = write_run(tmp_path / "run", {1: 10.0, 2: 9.0, 3: 8.0}, {3: 7.5})
    lines = (run / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines[:3]]
    for r, seconds, mfu in zip(steps, (30.0, 1.0, 3.0), (0.01, 0.4, 0.2)):  # the first step compiles
        r.update(train_step_s=seconds, train_tokens_per_s=1000 / seconds, train_mfu=mfu, train_peak_gib=[60.0, 61.5],
                 train_peak_reserved_gib=[64.0, 65.0])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps) + lines[3] + "\n")
    out = tmp_path / "s.json"
    assert main(["summary", str(run / "metrics.jsonl"), "--processes", "2", "--skip", "1", "--curve",
                 "--label", "x", "--out", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["steps"] == 3 and s["steps_timed"] == 2 and s["first_timed_step"] == 2
    assert s["tokens_per_s"] == pytest.approx(2000 / 4) and s["mfu"] == pytest.approx((0.4 * 1 + 0.2 * 3) / 4)
    assert s["peak_gib_per_gpu"] == [60.0, 61.5] and s["val_loss"] == 7.5
    assert s["train_loss"] == [[1, 10.0], [2, 9.0], [3, 8.0]] and s["val_loss_by_step"] == [[3, 7.5]]
    assert "x: 2 processes: 500 tokens/s over steps 2-3, MFU 25.0%, peak memory per GPU 60.0 / 61.5 GiB" in capsys.readouterr().out
