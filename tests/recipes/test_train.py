"""``python -m mmrec.recipes.train``: end to end, exact resume, and every bad input.

Most runs are in-process through ``main(argv)`` with a 1-layer tiny model on short
sequences; one test runs the real command in a subprocess and stops it with SIGTERM.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmrec.checkpoint import load_checkpoint
from mmrec.data import default_corpus
from mmrec.recipes import train as train_mod

SMALL = [
    "model.n_layers=1", "train.batch_size=4", "train.seq_len=32", "train.warmup_steps=3",
    "train.eval_batches=2", "train.sample_tokens=8",
]


def sets(*overrides):
    return [arg for o in (*SMALL, *overrides) for arg in ("--set", o)]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(default_corpus().text[:40_000])
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(run: Path) -> list[float]:
    return [r["train_loss"] for r in metrics(run) if "train_loss" in r]


def steps_saved(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("step_"))


def fail(capsys, argv, code=2) -> str:
    assert train_mod.main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    line = [e for e in err if e.startswith("error:")]
    assert len(line) == 1, err
    return line[0]


# --------------------------------------------------------------------------- runs


def test_default_corpus_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--out", str(run), *sets("train.steps=40", "train.batch_size=8", "train.seq_len=64",
                                     "train.eval_every=20", "train.save_every=20")]
    assert train_mod.main(argv) == 0
    out = capsys.readouterr().out
    losses = train_losses(run)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5, losses  # 5.5 -> below 4
    assert steps_saved(run) == ["step_000020", "step_000040"]
    evals = [r for r in metrics(run) if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    assert math.isclose(evals[1]["val_ppl"], math.exp(evals[1]["val_loss"]))
    assert f"validation loss {evals[1]['val_loss']:.4f}, perplexity" in out
    assert "sample (prompt in brackets):" in out
    record = metrics(run)[0]
    assert {"train_lr", "train_tokens_per_s", "train_grad_norm", "train_aux_loss"} <= set(record)
    recipe = json.loads((run / "step_000040" / "recipe.json").read_text())
    assert recipe["name"] == "tiny" and recipe["train"]["steps"] == 40 and recipe["model"]["n_layers"] == 1


def _stop_at(monkeypatch, step, signum=signal.SIGINT):
    """Deliver a real signal to this process in the middle of training step ``step``."""
    real, calls = train_mod.lm_loss, []

    def loss(logits, targets):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == step:
                signal.raise_signal(signum)
        return real(logits, targets)

    monkeypatch.setattr(train_mod, "lm_loss", loss)


def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path, text_file, monkeypatch, capsys):
    common = ["--data", str(text_file), *sets("train.steps=12", "train.save_every=5", "train.eval_every=4",
                                              "model.dropout=0.1", "train.grad_accum=2")]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train_mod.main(["--out", str(whole), *common]) == 0

    with monkeypatch.context() as m:
        _stop_at(m, 7 * 2)  # during step 7 (2 micro-batches a step): saved after it
        assert train_mod.main(["--out", str(split), *common]) == train_mod.EXIT_SIGINT
    err = capsys.readouterr().err
    assert "stopped by SIGINT at step 7" in err and f"--resume {split}" in err
    assert steps_saved(split) == ["step_000005", "step_000007"]

    assert train_mod.main(["--resume", str(split)]) == 0  # recipe, data and overrides come from the checkpoint
    assert "resuming from" in capsys.readouterr().out
    assert train_losses(split) == train_losses(whole)
    val = lambda run: [(r["step"], r["val_loss"]) for r in metrics(run) if "val_loss" in r]
    assert val(split) == val(whole)
    final = "step_000012/model.safetensors"
    a, b = load_file(split / final), load_file(whole / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_signal_between_steps_still_saves_where_it_stops(tmp_path, text_file, monkeypatch, capsys):
    """A signal that lands after a step's stop check (here: while the save decision of step 3,
    which is not due, is made) stops the run after the next step, which it saves."""
    from mmrec.recipes.checkpointing import Checkpointer

    real = Checkpointer.due

    def due(self, step, stopping):
        if step == 3:
            signal.raise_signal(signal.SIGTERM)
        return real(self, step, stopping)

    monkeypatch.setattr(Checkpointer, "due", due)
    run = tmp_path / "run"
    argv = ["--out", str(run), "--data", str(text_file), *sets("train.steps=12", "train.save_every=5")]
    assert train_mod.main(argv) == train_mod.EXIT_SIGTERM
    assert steps_saved(run) == ["step_000004"]
    assert f"stopped by SIGTERM at step 4; checkpoint {run / 'step_000004'}" in capsys.readouterr().err


def test_a_stop_before_any_step_names_no_checkpoint_that_is_not_there(tmp_path, text_file, monkeypatch, capsys):
    source, branch = tmp_path / "source", tmp_path / "branch"
    common = ["--data", str(text_file), *sets("train.steps=4", "train.save_every=2")]
    assert train_mod.main(["--out", str(source), *common]) == 0
    from mmrec.model import LanguageModel

    def train_mode(self, mode=True, real=LanguageModel.train):  # the loop sets it just before its first stop check
        signal.raise_signal(signal.SIGINT)
        return real(self, mode)

    monkeypatch.setattr(LanguageModel, "train", train_mode)
    resumed = source / "step_000002"
    assert train_mod.main(["--resume", str(resumed), "--out", str(branch), *sets("train.steps=6")]) == train_mod.EXIT_SIGINT
    err = capsys.readouterr().err
    assert f"no checkpoint in {branch} (no step had finished)" in err
    assert f"--resume {resumed} --out {branch}" in err and "checkpoint None" not in err


def test_resume_extends_a_finished_run(tmp_path, text_file, capsys):
    run = tmp_path / "run"
    assert train_mod.main(["--out", str(run), "--data", str(text_file), *sets("train.steps=4")]) == 0
    assert train_mod.main(["--resume", str(run / "step_000004"), "--set", "train.steps=6"]) == 0
    assert [r["step"] for r in metrics(run) if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert "step_000006" in steps_saved(run)


def test_resume_with_the_recipe_named_accepts_the_same_layers_written_otherwise(tmp_path, text_file, capsys):
    # tiny names its delta layers as a pattern (every 4); a run whose recipe listed them holds
    # the same model, so --recipe tiny resumes it; other layers are a different model
    run = tmp_path / "run"
    listed = 'model.layer_overrides=[{"layers": [0], "recurrence": {"kind": "delta", "heads": 1}, "decay_init": 0.999, "memory": {"kind": "none"}}]'
    assert train_mod.main(["--out", str(run), "--data", str(text_file), *sets("train.steps=2", listed)]) == 0
    assert train_mod.main(["--recipe", "tiny", "--resume", str(run), *sets("train.steps=3")]) == 0
    msg = fail(capsys, ["--recipe", "tiny", "--resume", str(run), *sets("train.steps=4", "model.n_layers=2")])
    assert "holds a different model" in msg and "model.n_layers: 1 in the checkpoint, 2 now" in msg


def test_bpe_tokenizer(tmp_path, text_file, capsys):
    pytest.importorskip("tokenizers")
    run = tmp_path / "run"
    argv = ["--out", str(run), "--data", str(text_file),
            *sets("train.steps=3", "train.tokenizer=bpe", "train.bpe_vocab_size=320")]
    assert train_mod.main(argv) == 0
    ckpt = run / "step_000003"
    assert (ckpt / "tokenizer.json").is_file()
    assert json.loads((ckpt / "recipe.json").read_text())["model"]["vocab_size"] == 320
    assert "bpe tokens (vocabulary 320)" in capsys.readouterr().out
    assert train_mod.main(["--resume", str(run), "--set", "train.steps=4"]) == 0
    msg = fail(capsys, ["--resume", str(run), "--set", "train.tokenizer=byte"])
    assert "trained with the bpe tokenizer" in msg


def test_switches_keep_the_numbers(tmp_path, text_file, capsys):
    """Activation checkpointing recomputes the same values; accumulating two half
    batches trains on the same samples as one full batch."""
    def losses(name, *overrides):
        assert train_mod.main(["--out", str(tmp_path / name), "--data", str(text_file),
                               *sets("train.steps=3", "train.sample_tokens=0", *overrides)]) == 0
        return train_losses(tmp_path / name)

    plain = losses("plain", "model.dropout=0.1")
    assert losses("ckpt", "model.dropout=0.1", "train.activation_checkpointing=true") == plain
    full = losses("full", "train.batch_size=8")
    accumulated = losses("accum", "train.batch_size=4", "train.grad_accum=2")
    assert accumulated == pytest.approx(full, rel=1e-4)
    bf16 = losses("bf16", "train.dtype=bfloat16")
    assert bf16 == pytest.approx(plain, rel=0.05)


def test_tf32_sets_the_float32_matmul_precision_for_the_run(tmp_path, text_file, monkeypatch, capsys):
    seen, fit = [], train_mod.Trainer.fit
    monkeypatch.setattr(train_mod.Trainer, "fit", lambda self: seen.append(torch.get_float32_matmul_precision()) or fit(self))
    torch.set_float32_matmul_precision("medium")
    for tf32 in (True, False):
        assert train_mod.main(["--out", str(tmp_path / str(tf32)), "--data", str(text_file),
                               *sets("train.steps=1", "train.sample_tokens=0", f"train.tf32={str(tf32).lower()}")]) == 0
        assert torch.get_float32_matmul_precision() == "medium"  # the caller's, once the run is over
    assert seen == ["high", "highest"]


def test_default_run_folder_is_never_reused(tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--data", str(text_file), *sets("train.steps=1", "train.sample_tokens=0")]
    assert train_mod.main(argv) == 0
    assert train_mod.main(argv) == 0
    assert steps_saved(tmp_path / "runs" / "tiny") == ["step_000001"]
    assert steps_saved(tmp_path / "runs" / "tiny-2") == ["step_000001"]
    assert "run folder runs/tiny-2" in capsys.readouterr().out


def test_tensorboard(tmp_path, text_file, capsys):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert train_mod.main(["--out", str(run), "--data", str(text_file), "--tensorboard",
                           *sets("train.steps=2", "train.sample_tokens=0")]) == 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_command_line_and_sigterm(tmp_path, text_file):
    """The real command in a subprocess: progress, then SIGTERM saves and exits 143."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmrec.recipes.train", "--out", str(run), "--data", str(text_file),
           *sets("train.steps=100000", "train.save_every=100000")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        log = run / "metrics.jsonl"
        while not (log.exists() and log.read_text().count("\n") >= 2):  # two whole lines
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    step = len(train_losses(run))
    assert f"stopped by SIGTERM at step {step}" in err
    assert "train tiny" in err and "loss=" in err and "tok_s=" in err and "lr=" in err  # the progress bar
    assert steps_saved(run) == [f"step_{step:06d}"]
    assert "M parameters on cpu" in out


# --------------------------------------------------------------------------- bad input


def test_missing_and_empty_data(tmp_path, capsys):
    assert "data not found" in fail(capsys, ["--data", str(tmp_path / "nope.txt")])
    (tmp_path / "empty.txt").write_text("")
    assert "data is empty" in fail(capsys, ["--data", str(tmp_path / "empty.txt")])
    (tmp_path / "folder").mkdir()
    assert "no text files" in fail(capsys, ["--data", str(tmp_path / "folder")])
    (tmp_path / "short.txt").write_text("too short to train on")
    assert "too small" in fail(capsys, ["--data", str(tmp_path / "short.txt")])
    assert not (tmp_path / "runs").exists()


def test_bad_recipe_and_overrides(tmp_path, capsys):
    assert "train.lr" in fail(capsys, ["--out", str(tmp_path), "--set", "train.lr=-1"])
    assert "unknown recipe" in fail(capsys, ["--recipe", "no-such-recipe"])
    assert "train.nonsense" in fail(capsys, ["--set", "train.nonsense=1"])


@pytest.fixture
def finished_run(tmp_path, text_file):
    run = tmp_path / "run"
    assert train_mod.main(["--out", str(run), "--data", str(text_file),
                           *sets("train.steps=4", "train.save_every=2")]) == 0
    return run


def test_damaged_checkpoints(finished_run, capsys):
    ckpt = finished_run / "step_000004"
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x55
    weights.write_bytes(bytes(data))
    msg = fail(capsys, ["--resume", str(finished_run)])
    assert f"{weights} is corrupted" in msg and "step_000002" in msg

    trainer = finished_run / "step_000002" / "trainer.pt"
    trainer.write_bytes(trainer.read_bytes()[:100])
    assert f"{trainer} is truncated" in fail(capsys, ["--resume", str(finished_run / "step_000002")])

    (ckpt / "manifest.json").unlink()
    assert "manifest.json is missing" in fail(capsys, ["--resume", str(ckpt)])
    assert "checkpoint not found" in fail(capsys, ["--resume", str(finished_run / "step_000099")])


def test_checkpoint_of_another_model(finished_run, capsys):
    msg = fail(capsys, ["--resume", str(finished_run), "--set", "model.n_layers=2", "--set", "model.d_model=64"])
    assert "holds a different model" in msg
    assert "model.n_layers: 1 in the checkpoint, 2 now" in msg and "model.d_model: 128 in the checkpoint, 64 now" in msg
    msg = fail(capsys, ["--resume", str(finished_run), "--recipe", "tiny"])  # tiny has 4 layers
    assert "model.n_layers: 1 in the checkpoint, 4 now" in msg


def test_out_dir_with_another_run_is_refused(finished_run, capsys):
    msg = fail(capsys, ["--out", str(finished_run)])
    assert "already holds checkpoints" in msg and f"--resume {finished_run}" in msg


def test_out_dir_with_metrics_of_a_run_that_saved_nothing_is_refused(tmp_path, text_file, capsys):
    run = tmp_path / "run"
    assert train_mod.main(["--out", str(run), "--data", str(text_file), *sets("train.steps=2", "train.save=false")]) == 0
    before = (run / "metrics.jsonl").read_text()
    msg = fail(capsys, ["--out", str(run), "--data", str(text_file), *sets("train.steps=2")])
    assert "metrics.jsonl of an earlier run" in msg
    assert (run / "metrics.jsonl").read_text() == before  # nothing appended


def test_default_run_folder_skips_folders_that_hold_a_run(tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "metrics.jsonl").write_text("{}\n")  # e.g. a run that crashed before saving
    assert train_mod.main(["--data", str(text_file), *sets("train.steps=1")]) == 0
    assert "run folder runs/tiny-2" in capsys.readouterr().out
    assert (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text() == "{}\n"


def test_resuming_a_finished_run_says_to_raise_the_steps(finished_run, capsys):
    msg = fail(capsys, ["--resume", str(finished_run)])
    assert "is at step 4 and train.steps is 4" in msg and "--set train.steps=8" in msg


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, text_file, monkeypatch, capsys):
    real, calls = train_mod.lm_loss, []

    def loss(logits, targets):
        value = real(logits, targets)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 5:
                return value * float("nan")
        return value

    monkeypatch.setattr(train_mod, "lm_loss", loss)
    run = tmp_path / "run"
    msg = fail(capsys, ["--out", str(run), "--data", str(text_file), *sets("train.steps=10", "train.save_every=3")],
               code=train_mod.EXIT_DIVERGED)
    assert "diverged at step 5: loss nan" in msg and f"last good checkpoint is {run / 'step_000003'}" in msg
    assert steps_saved(run) == ["step_000003"]
    assert [r["step"] for r in metrics(run) if "train_loss" in r] == [1, 2, 3, 4]


def test_save_best_keeps_the_lowest_validation_loss_through_a_resume(tmp_path, text_file, capsys):
    run = tmp_path / "run"
    # a learning rate high enough that validation loss goes up as well as down
    common = sets("train.eval_every=1", "train.save_best=true", "train.lr=0.05", "train.warmup_steps=0")
    assert train_mod.main(["--out", str(run), "--data", str(text_file), *common, "--set", "train.steps=5"]) == 0
    assert train_mod.main(["--resume", str(run), "--set", "train.steps=9"]) == 0
    val = {r["step"]: r["val_loss"] for r in metrics(run) if "val_loss" in r}
    assert sorted(val) == list(range(1, 10))
    best_step = min(val, key=val.get)
    assert steps_saved(run / "best") == [f"step_{best_step:06d}"]  # only the best is kept
    best = load_checkpoint(run / "best")
    assert best.step == best_step and best.trainer_state()["best_val_loss"] == pytest.approx(val[best_step])
    assert steps_saved(run)[-1] == "step_000009"  # resuming still picks the newest regular checkpoint
