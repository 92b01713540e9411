"""``python -m mmrec.recipes.train`` under faults and bad input (issue #21): numbers that
are not finite or out of range, updates that leave non-finite weights, resuming an older
checkpoint, models too large for the machine, and the metrics log after a kill."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mmrec
from mmrec import checkpoint as ck
from mmrec import metrics as metrics_log
from mmrec import sizing
from mmrec.data import default_corpus
from mmrec.recipes import train as train_mod
from tests.recipes.test_train import fail, metrics, sets, steps_saved


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(default_corpus().text[:40_000])
    return path


@pytest.fixture
def finished_run(tmp_path, text_file):
    """As in test_train: 4 steps, checkpoints at 2 and 4."""
    run = tmp_path / "run"
    assert train_mod.main(["--out", str(run), "--data", str(text_file),
                           *sets("train.steps=4", "train.save_every=2")]) == 0
    return run


def strict_json_lines(run):
    """Each line of metrics.jsonl, parsed as strict JSON (no NaN, Infinity)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def rewrite_in_checkpoint(ckpt, name, data: bytes):
    """Replace a checkpoint's file and its manifest entry: a file that is intact but wrong."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": ck._sha256(ckpt / name)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def poison_update(monkeypatch, at_update: int):
    """The optimizer's ``at_update``-th step leaves inf in the embedding (finite loss and
    gradients: what an overflowing update does)."""
    real = train_mod.build_optimizer

    def build(model, train):
        optimizer, calls = real(model, train), []

        def poison(optimizer, args, kwargs):
            calls.append(1)
            if len(calls) == at_update:
                with torch.no_grad():
                    model.embed.weight[3, 5] = float("inf")

        optimizer.register_step_post_hook(poison)
        return optimizer

    monkeypatch.setattr(train_mod, "build_optimizer", build)


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("override, expected", [
    ("train.lr=inf", "train.lr: Input should be a finite number"),
    ("train.lr=Infinity", "train.lr: Input should be a finite number"),
    ("train.lr=NaN", "train.lr: Input should be a finite number"),
    ("train.lr=1e39", "train.lr: Input should be less than or equal to 1"),  # overflowed AdamW before
    ("train.lr=1e12", "train.lr: Input should be less than or equal to 1"),
])
def test_non_finite_or_huge_learning_rate_is_a_validation_error(tmp_path, capsys, override, expected):
    run = tmp_path / "run"
    msg = fail(capsys, ["--out", str(run), *sets("train.steps=1", override)])
    assert expected in msg
    assert not run.exists()  # refused before any work


def test_an_update_that_leaves_non_finite_weights_saves_nothing(tmp_path, text_file, monkeypatch, capsys):
    poison_update(monkeypatch, 2)
    run = tmp_path / "run"
    msg = fail(capsys, ["--out", str(run), "--data", str(text_file), *sets("train.steps=3", "train.save_every=1")],
               code=train_mod.EXIT_DIVERGED)
    assert "diverged at step 2: the update left weights that are not finite (embed.weight)" in msg
    assert f"last good checkpoint is {run / 'step_000001'}" in msg
    assert steps_saved(run) == ["step_000001"]
    weights = load_file(run / "step_000001" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [r["step"] for r in metrics(run) if "train_loss" in r] == [1]  # the bad step is not logged


def test_a_one_step_run_with_non_finite_weights_fails_and_saves_nothing(tmp_path, text_file, monkeypatch, capsys):
    poison_update(monkeypatch, 1)
    run = tmp_path / "run"
    msg = fail(capsys, ["--out", str(run), "--data", str(text_file), *sets("train.steps=1")],
               code=train_mod.EXIT_DIVERGED)
    assert "diverged at step 1" in msg and "no checkpoint had been saved yet" in msg
    assert steps_saved(run) == []


def test_metrics_are_strict_json_with_null_for_non_finite(tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.setattr(train_mod, "evaluate", lambda *args: float("nan"))
    run = tmp_path / "run"
    assert train_mod.main(["--out", str(run), "--data", str(text_file), *sets("train.steps=2", "train.sample_tokens=0")]) == 0
    records = strict_json_lines(run)
    [val] = [r for r in records if "val_loss" in r]
    assert val == {"step": 2, "val_loss": None, "val_ppl": None}

    log = metrics_log.MetricsLog(tmp_path, tensorboard=False)
    log.write({"step": 1, "a": float("inf"), "b": [1.0, float("-inf")], "c": {"d": float("nan")}})
    log.close()
    assert strict_json_lines(tmp_path)[-1] == {"step": 1, "a": None, "b": [1.0, None], "c": {"d": None}}


def test_resuming_a_checkpoint_with_non_finite_weights_is_refused(finished_run, capsys):
    """A checkpoint an earlier version saved after diverging: intact files, NaN weights."""
    ckpt = finished_run / "step_000004"
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    weights = load_file(ckpt / "model.safetensors")
    weights["norm.weight"][0] = float("nan")
    save_file(weights, str(ckpt / "model.safetensors"), metadata=meta)
    rewrite_in_checkpoint(ckpt, "model.safetensors", (ckpt / "model.safetensors").read_bytes())
    msg = fail(capsys, ["--resume", str(finished_run), "--set", "train.steps=6"])
    assert f"{ckpt} holds weights that are not finite (norm.weight)" in msg
    assert f"--resume {finished_run / 'step_000002'} --discard-newer" in msg


def test_trainer_state_of_another_kind_is_refused(finished_run, capsys):
    ckpt = finished_run / "step_000004"
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    del state["scheduler"]
    torch.save(state, ckpt / "trainer.pt")
    rewrite_in_checkpoint(ckpt, "trainer.pt", (ckpt / "trainer.pt").read_bytes())
    msg = fail(capsys, ["--resume", str(ckpt), "--set", "train.steps=6"])
    assert f"{ckpt / 'trainer.pt'} lacks scheduler" in msg

    state["scheduler"], state["step"] = {}, 2
    torch.save(state, ckpt / "trainer.pt")
    rewrite_in_checkpoint(ckpt, "trainer.pt", (ckpt / "trainer.pt").read_bytes())
    assert "trainer.pt is of step 2, but" in fail(capsys, ["--resume", str(ckpt), "--set", "train.steps=6"])


# --------------------------------------------------------------------------- resuming older checkpoints


def test_resuming_an_older_checkpoint_is_refused_and_overwrites_nothing(finished_run, capsys):
    newer = finished_run / "step_000004"
    before = {p.name: p.read_bytes() for p in newer.iterdir()}
    log_before = (finished_run / "metrics.jsonl").read_text()
    old = finished_run / "step_000002"
    msg = fail(capsys, ["--resume", str(old)])
    assert f"{finished_run} holds checkpoints newer than step_000002 (step_000004)" in msg
    assert f"--resume {finished_run})" in msg and f"--resume {old} --out NEW_FOLDER" in msg
    assert f"--resume {old} --discard-newer" in msg
    assert {p.name: p.read_bytes() for p in newer.iterdir()} == before
    assert (finished_run / "metrics.jsonl").read_text() == log_before


def test_an_older_checkpoint_branches_off_into_another_folder(finished_run, tmp_path, capsys):
    branch = tmp_path / "branch"
    assert train_mod.main(["--resume", str(finished_run / "step_000002"), "--out", str(branch),
                           "--set", "train.lr=1e-3"]) == 0
    assert steps_saved(branch) == ["step_000004"] and steps_saved(finished_run) == ["step_000002", "step_000004"]
    assert [r["step"] for r in metrics(branch) if "train_loss" in r] == [3, 4]


def test_discard_newer_says_what_it_deletes(finished_run, capsys):
    old = finished_run / "step_000002"
    losses = {r["step"]: r["train_loss"] for r in metrics(finished_run) if "train_loss" in r}
    assert train_mod.main(["--resume", str(old), "--discard-newer"]) == 0
    captured = capsys.readouterr()
    assert f"--discard-newer: deleted {finished_run / 'step_000004'}" in captured.out
    assert "removed 4 records of steps 3-4" in captured.err  # train 3 and 4, validation 4, throughput
    records = metrics(finished_run)
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4]
    assert {r["step"]: r["train_loss"] for r in records if "train_loss" in r} == losses  # trained again alike
    assert [r.get("event") for r in records].count("throughput") == 1  # the first attempt's went with its steps
    assert "--discard-newer goes with --resume" in fail(capsys, ["--discard-newer"])


def test_resuming_the_best_checkpoint_continues_in_its_run_folder(tmp_path, text_file, capsys):
    run = tmp_path / "run"
    assert train_mod.main(["--out", str(run), "--data", str(text_file),
                           *sets("train.steps=4", "train.save_best=true", "train.eval_every=1")]) == 0
    assert steps_saved(run / "best") == ["step_000004"]  # the loss falls at every step here
    assert train_mod.main(["--resume", str(run / "best"), "--set", "train.steps=5"]) == 0
    assert steps_saved(run) == ["step_000004", "step_000005"]  # not into run/best
    assert steps_saved(run / "best") == ["step_000005"] and not (run / "best" / "metrics.jsonl").exists()

    older = tmp_path / "older"  # a best older than the run's newest checkpoint: refused as any older one
    shutil.copytree(run, older)
    shutil.rmtree(older / "best" / "step_000005")
    shutil.copytree(older / "step_000004", older / "best" / "step_000004")
    msg = fail(capsys, ["--resume", str(older / "best"), "--set", "train.steps=6"])
    assert f"{older} holds checkpoints newer than step_000004 (step_000005)" in msg


def test_a_newer_best_checkpoint_is_replaced_by_the_resumed_runs_best(tmp_path, text_file, capsys):
    """A run killed after saving its best but before its next regular checkpoint leaves a
    best newer than the checkpoint resumed: the first new best replaces it (keep_last=1 by
    step number would have deleted the new one)."""
    run = tmp_path / "run"
    assert train_mod.main(["--out", str(run), "--data", str(text_file),
                           *sets("train.steps=3", "train.save_best=true", "train.eval_every=1")]) == 0
    [(_, best)] = ck.list_checkpoints(run / "best")
    shutil.copytree(best, run / "best" / "step_000099")  # as if saved by the killed attempt
    assert train_mod.main(["--resume", str(run), "--set", "train.steps=5"]) == 0
    assert "best/step_000099 is newer than step_000003" in capsys.readouterr().err
    val = {r["step"]: r["val_loss"] for r in metrics(run) if "val_loss" in r}
    improved = [s for s in (4, 5) if val[s] < min(val[t] for t in range(1, s))]
    assert improved and [s for s, _ in ck.list_checkpoints(run / "best")] == [improved[-1]]


# --------------------------------------------------------------------------- metrics after a kill


def test_resume_after_a_kill_leaves_one_record_per_step(finished_run, capsys):
    """kill -9 during step 4 after the checkpoint of step 2: the log has records of step 3
    and a line cut short; resuming from 2 trains 3 and 4 again, and the log tells the run
    as it went on."""
    shutil.rmtree(finished_run / "step_000004")
    log = finished_run / "metrics.jsonl"
    lines = [line for line in log.read_text().splitlines() if json.loads(line).get("step", 0) <= 3
             and "event" not in json.loads(line)]
    log.write_text("\n".join(lines) + "\n" + '{"step": 4, "train_lo')
    assert train_mod.main(["--resume", str(finished_run)]) == 0
    assert "removed 2 records of step 3" in capsys.readouterr().err  # step 3's and the cut line
    records = strict_json_lines(finished_run)
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4]
    resume = [i for i, r in enumerate(records) if r.get("event") == "resume"]
    assert len(resume) == 1 and records[resume[0]]["step"] == 2
    assert all(r["step"] <= 2 for r in records[:resume[0]] if "step" in r)


def test_continue_metrics_cleans_a_log_written_before_the_rule(tmp_path):
    """A log of an older version: steps 1-3, a resume from 2, steps 3-5; resuming from 4."""
    log = tmp_path / "metrics.jsonl"
    rec = lambda step, loss: json.dumps({"step": step, "train_loss": loss})
    log.write_text("\n".join([rec(1, 5.0), rec(2, 4.0), rec(3, 3.9), '{"event": "resume", "step": 2}',
                              rec(3, 3.0), rec(4, 2.0), rec(5, 1.0), "not json", "{\"event\": \"throughput\"}"]) + "\n")
    removed = metrics_log.continue_metrics(log, 4)
    assert removed == [rec(3, 3.9), rec(5, 1.0), "not json", '{"event": "throughput"}']
    assert log.read_text().splitlines() == [rec(1, 5.0), rec(2, 4.0), '{"event": "resume", "step": 2}',
                                            rec(3, 3.0), rec(4, 2.0)]
    assert metrics_log.continue_metrics(log, 4) == []  # nothing more to do
    assert metrics_log.continue_metrics(tmp_path / "none.jsonl", 4) == []


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("overrides, figure", [
    # a weight of 1e18 elements: the embedding is the bound (no delta layer: its heads would be
    # refused first, too wide for the kernel)
    (("model.d_model=1000000000", "model.layer_overrides=[]"), "at least"),
    (("model.n_layers=100000000",), "~"),  # counted on the meta device from 1 and 2 layers
])
def test_impossible_sizes_are_refused_up_front(tmp_path, capsys, overrides, figure):
    run = tmp_path / "run"
    msg = fail(capsys, ["--out", str(run), "--device", "cpu", *sets(*overrides)])
    assert f"needs {figure}" in msg and "for its weights, gradients and AdamW state" in msg
    assert "TiB" in msg and "this machine has" in msg and "make the model smaller" in msg
    assert not run.exists()


def test_size_estimate_is_the_built_models_count():
    for name in ("tiny", "7b", "transformer-small"):
        recipe = mmrec.recipes.load(name)
        with torch.device("meta"):
            count = mmrec.build(recipe).num_parameters()
        assert sizing.estimate_parameters(recipe.model) == (count, True)
    planned = mmrec.recipes.load("tiny", ["model.short_conv=4", "model.n_layers=3", "model.tie_embeddings=true"])
    with torch.device("meta"):
        assert sizing.estimate_parameters(planned.model)[0] == mmrec.build(planned).num_parameters()
    # hybrid stacks: the overridden layers (beyond the first two) have other parameters
    groups = ('model.layer_overrides=[{"layers": [5], "recurrence": {"kind": "delta"}, "memory": {"kind": "none"}}, '
              '{"layers": [2, 3], "recurrence": {"kind": "exact"}}]')
    for hybrid in (mmrec.recipes.load("docs/results/recipes/1b-hybrid.json"),
                   mmrec.recipes.load("tiny", ["model.n_layers=6", groups])):
        with torch.device("meta"):
            count = mmrec.build(hybrid).num_parameters()
            plain = mmrec.build(hybrid, ["model.layer_overrides=[]"]).num_parameters()
        assert count != plain and sizing.estimate_parameters(hybrid.model) == (count, True)
    # counted per group, not by building the layers up to the last one named
    deep = mmrec.recipes.load("tiny", ["model.n_layers=100000000", 'model.layer_overrides=[{"layers": [99999999], '
                                       '"recurrence": {"kind": "delta"}}]'])
    assert sizing.estimate_parameters(deep.model)[1]


def test_7b_fits_eight_gpus_with_fsdp_but_not_one(monkeypatch):
    """16 bytes a parameter (fp32 weights, gradients, AdamW moments): 7.06e9 parameters need
    105 GiB, over an 80 GiB GPU in one process, 13.2 GiB a process over 8."""
    monkeypatch.setattr(sizing, "memory_of", lambda device: (80 * 2**30, "the GPU has"))
    config = mmrec.recipes.load("7b").model
    cuda = torch.device("cuda")
    with pytest.raises(sizing.ModelTooLarge, match=r"needs ~105\.3 GiB .* more than the 80\.0 GiB the GPU has.*torchrun"):
        sizing.check_fits(config, cuda, world=1)
    sizing.check_fits(config, cuda, world=8)
    # CPU processes on one host share its memory
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(sizing.ModelTooLarge, match=r"13\.2 GiB per process, 105\.3 GiB for the processes on this machine"):
        sizing.check_fits(config, torch.device("cpu"), world=8)
