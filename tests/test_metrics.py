"""mmrec.metrics: the trackers get the numbers metrics.jsonl holds, under the same names.

wandb runs offline here (``WANDB_MODE=offline``), everything it writes kept in the test's
folder."""

import json
import sys

import pytest

from mmrec import metrics
from mmrec.data import default_corpus
from mmrec.recipes import train as train_mod

RECORDS = [
    {"step": 1, "train_loss": 5.5, "lr": 3e-4, "grad_norm": 1.25},
    {"step": 1, "val_loss": 5.25},
    {"step": 2, "train_loss": 5.0, "lr": 6e-4, "grad_norm": 0.75},
    {"event": "throughput", "tokens_per_s": 120.0},  # no step: metrics.jsonl only
]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    logged: list[tuple[int, dict]] = []
    write = metrics.WandbRun.write

    def recording(self, step, numbers):
        logged.append((step, dict(numbers)))
        write(self, step, numbers)

    monkeypatch.setattr(metrics.WandbRun, "write", recording)
    return logged


def by_step(pairs) -> dict[int, dict]:
    merged: dict[int, dict] = {}
    for step, numbers in pairs:
        merged.setdefault(step, {}).update(numbers)
    return merged


def test_wandb_gets_what_tensorboard_gets(tmp_path, offline_wandb):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    out.mkdir()
    log = metrics.MetricsLog(out, tensorboard=True, wandb=True, config={"model": {"d_model": 32}})
    scalars = []
    add_scalar = log.tb.add_scalar
    log.tb.add_scalar = lambda key, value, step: (scalars.append((step, {key: value})), add_scalar(key, value, step))
    run = log.wandb.run
    for record in RECORDS:
        log.write(record)
    assert run.config["model"] == {"d_model": 32} and run.name == "run" and run.group == "run"
    log.close()
    expected = {1: {"train/loss": 5.5, "lr": 3e-4, "grad/norm": 1.25, "val/loss": 5.25},
                2: {"train/loss": 5.0, "lr": 6e-4, "grad/norm": 0.75}}
    assert by_step(offline_wandb) == by_step(scalars) == expected
    assert [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] == RECORDS
    import wandb

    wandb.teardown()  # the wandb service writes the run file in the background: wait for it to finish
    written = b"".join(f.read_bytes() for f in (out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert b"train/loss" in written and b"grad/norm" in written  # wandb's own offline record of the run


def test_train_logs_each_step_to_wandb(tmp_path, offline_wandb):
    data = tmp_path / "corpus.txt"
    data.write_text(default_corpus().text[:20_000])
    run = tmp_path / "run"
    settings = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.ffn_dim=64", "train.steps=3",
                "train.batch_size=2", "train.seq_len=32", "train.warmup_steps=1", "train.eval_every=2",
                "train.eval_batches=1", "train.sample_tokens=0"]
    assert train_mod.main(["--out", str(run), "--data", str(data), "--wandb",
                           *[a for s in settings for a in ("--set", s)]]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = by_step((r["step"], metrics.scalars(r)) for r in records if "step" in r and metrics.scalars(r))
    assert by_step(offline_wandb) == expected
    assert {"train/loss", "val/loss"} <= set(expected[2]) and sorted(expected) == [1, 2, 3]
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))


def test_train_without_wandb_installed_says_so_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    assert train_mod.main(["--out", str(tmp_path / "run"), "--wandb"]) == 2
    assert "--wandb needs the wandb package" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
