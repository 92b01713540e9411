"""``torchrun -m mmrec.recipes.train``: two CPU processes (gloo, FSDP2) train exactly what
one process trains, save distributed checkpoints that resume on another number of
processes, export to the single-file layout, and stop together on SIGTERM.

Every torchrun launch costs a few seconds of start-up, so the runs are shared by the tests
of this module (a module-scoped fixture); the whole module takes about half a minute.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import mmrec
from mmrec import distributed
from mmrec.checkpoint import load_checkpoint
from mmrec.data import default_corpus
from mmrec.recipes import generate as generate_mod
from mmrec.recipes import train as train_mod

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed with the gloo backend"),
]

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.ffn_dim=128", "model.memory.dim=32",
    "train.batch_size=4", "train.grad_accum=2", "train.seq_len=64", "train.steps=4", "train.warmup_steps=2", "train.eval_every=2",
    "train.save_every=2", "train.eval_batches=2", "train.sample_tokens=8",
]


def sets(*overrides):
    return [arg for o in (*TINY, *overrides) for arg in ("--set", o)]


def torchrun_cmd(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "mmrec.recipes.train", *args]


ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def torchrun(*args, nproc=2, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun_cmd(*args, nproc=nproc), capture_output=True, text=True, env=ENV, timeout=300,
                          check=False)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def by_step(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in metrics(run) if key in r}


def close(a: dict, b: dict, rel=1e-4) -> bool:
    return a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], rel=rel) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4 steps (of 2 accumulated micro-batches) in one process (this one) and in
    two (torchrun)."""
    root = tmp_path_factory.mktemp("dist")
    data = root / "corpus.txt"
    data.write_text(default_corpus().text[:40_000])
    one, two = root / "one", root / "two"
    assert train_mod.main(["--out", str(one), "--data", str(data), *sets()]) == 0
    started = time.perf_counter()
    # activation checkpointing recomputes the same numbers: on here, off in the single process
    proc = torchrun("--out", str(two), "--data", str(data), "--peak-tflops", "0.5",
                    *sets("train.activation_checkpointing=true"))
    return {"root": root, "data": data, "one": one, "two": two, "proc": proc,
            "seconds": time.perf_counter() - started}


def test_two_processes_train_what_one_trains(runs):
    one, two, proc = runs["one"], runs["two"], runs["proc"]
    for key in ("train_loss", "train_aux_loss", "train_grad_norm", "val_loss"):
        assert close(by_step(one, key), by_step(two, key)), key
    assert list(by_step(two, "train_loss")) == [1, 2, 3, 4]
    # rank 0 alone prints and logs
    assert proc.stdout.count("M parameters on 2 processes on cpu (FSDP)") == 1
    assert proc.stdout.count("sample (prompt in brackets):") == 1
    assert proc.stdout.count("step 4: validation loss") == 1
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr

    ckpt = load_checkpoint(two / "step_000004")
    assert ckpt.layout == "dcp" and ckpt.step == 4 and ckpt.recipe["model"]["n_layers"] == 2
    names = sorted(p.name for p in (two / "step_000004" / "dcp").iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in two.iterdir() if p.name.startswith("step_")) == ["step_000002", "step_000004"]
    state = ckpt.trainer_state()
    assert "optimizer" not in state and len(state["rng_per_rank"]) == 2
    assert state["data"]["samples_seen"] == 32


def test_throughput_is_logged(runs):
    """Tokens/s of both processes together, and MFU against the given matmul rate (on CPU
    nothing is measured, so the single process, given none, logs no MFU)."""
    two, proc = metrics(runs["two"]), runs["proc"]
    with torch.device("meta"):
        model = mmrec.build("tiny", [*TINY, "model.vocab_size=256"])
    per_token = model.flops_per_token(64)
    steps = [r for r in two if "train_loss" in r]
    assert len(steps) == 4
    for r in steps:
        assert r["train_step_s"] > 0
        assert r["train_tokens_per_s"] == pytest.approx(4 * 64 * 2 / r["train_step_s"])  # the global batch
        assert r["train_mfu"] == pytest.approx(per_token * r["train_tokens_per_s"] / (2 * 0.5e12))
        assert "train_peak_gib" not in r  # GPU memory only
    [summary] = [r for r in two if r.get("event") == "throughput"]
    assert summary["steps_timed"] == 1 and summary["peak_tflops"] == 0.5  # steps after the first 3
    assert summary["tokens_per_s"] == pytest.approx(steps[-1]["train_tokens_per_s"])
    assert proc.stdout.count("throughput: ") == 1 and "MFU against 0.5 TFLOP/s per device (given)" in proc.stdout
    one = [r for r in metrics(runs["one"]) if "train_loss" in r]
    assert all("train_tokens_per_s" in r and "train_mfu" not in r for r in one)


def _init_worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    """One of ``world`` gloo processes: shard a model built on the meta device, give it
    memory full of NaN, initialise it, and (rank 0) save the gathered weights."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo")
    try:
        with torch.device("meta"):
            model = mmrec.build("tiny", overrides)
        distributed.shard_model(model, torch.device("cpu"))
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().fill_(float("nan"))
        model.reset_parameters(seed=11)
        shapes = [tuple(p.to_local().shape) for p in model.parameters()]
        full = {name: p.full_tensor() for name, p in model.named_parameters()}
        if rank == 0:
            torch.save({"full": full, "shapes": shapes}, out)
        # both ranks reach the teardown together: a gloo process whose peer has gone can
        # abort in it ("terminate called without an active exception", one run in ~8)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sharded_initialisation_is_the_single_process_one(tmp_path):
    """Each process initialises its shard of the weights one process has: uneven shards
    (131 vocabulary rows over 2), tied embedding and head."""
    overrides = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.ffn_dim=48", "model.memory.dim=16",
                 "model.vocab_size=131", "model.tie_embeddings=true"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "sharded.pt"
    torch.multiprocessing.spawn(_init_worker, args=(2, port, overrides, str(out)), nprocs=2)
    got = torch.load(out)
    assert ((66, 32) in got["shapes"]) and ((65, 32) not in got["shapes"])  # rank 0's half of the embedding

    with torch.device("meta"):
        model = mmrec.build("tiny", overrides)
    model.to_empty(device="cpu")
    model.reset_parameters(seed=11)
    expected = dict(model.named_parameters())
    assert got["full"].keys() == expected.keys() and "head.weight" not in expected  # tied: listed once
    for name, value in expected.items():
        assert torch.isfinite(got["full"][name]).all() and torch.equal(got["full"][name], value), name


def test_the_gpu_run_script_on_cpu(runs):
    """``tools/fsdp_7b.sh`` with DRY_RUN=1: the tiny recipe on 2 gloo processes, no
    checkpoint (SAVE=0), metrics and a summary in $OUT."""
    out, run_dir = runs["root"] / "script-out", runs["root"] / "script-run"
    env = {**ENV, "DRY_RUN": "1", "OUT": str(out), "RUN_DIR": str(run_dir), "PYTHON": sys.executable,
           "STEPS": "4", "SKIP_DRY": "1", "SEQ": "32", "DATA": str(runs["data"])}
    proc = subprocess.run(["bash", str(REPO / "tools" / "fsdp_7b.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4 and summary["steps_timed"] == 3
    assert summary["loss_last"] < summary["loss_first"] and 0 < summary["mfu"] < 1
    assert "2 processes: " in proc.stdout and "; loss " in proc.stdout
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]  # train.save=false: no checkpoint


def test_resume_on_another_number_of_processes(runs, capsys):
    """2 processes -> 1 (a distributed checkpoint), and 1 -> 2 (a single-file one)."""
    one, root = runs["one"], runs["root"]
    expected = by_step(one, "train_loss")

    down = root / "two-then-one"
    down.mkdir()
    shutil.copytree(runs["two"] / "step_000002", down / "step_000002")
    assert train_mod.main(["--resume", str(down)]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert close({s: expected[s] for s in (3, 4)}, by_step(down, "train_loss"))
    assert close({4: by_step(one, "val_loss")[4]}, by_step(down, "val_loss"))
    assert load_checkpoint(down / "step_000004").layout == "single"
    a, b = load_file(one / "step_000004" / "model.safetensors"), load_file(down / "step_000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)

    up = root / "one-then-two"
    up.mkdir()
    shutil.copytree(one / "step_000002", up / "step_000002")
    proc = torchrun("--resume", str(up))
    assert proc.stdout.count("resuming from") == 1
    assert close({s: expected[s] for s in (3, 4)}, by_step(up, "train_loss"))
    assert load_checkpoint(up / "step_000004").layout == "dcp"


def test_export_and_generate(runs, capsys):
    two, one = runs["two"], runs["one"]
    assert train_mod.main(["--export", str(two)]) == 0
    exported = two / "export" / "step_000004"
    assert f"to {exported}" in capsys.readouterr().out
    ckpt = load_checkpoint(exported)
    assert ckpt.layout == "single" and ckpt.step == 4
    a, b = load_file(one / "step_000004" / "model.safetensors"), load_file(exported / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)

    prompt = ["--prompt", "The ", "--max-new-tokens", "6", "--seed", "1", "--temperature", "0"]
    texts = []
    for source in (exported, two / "step_000004"):  # the export, and the distributed checkpoint as it is
        assert generate_mod.main(["--checkpoint", str(source), *prompt]) == 0
        captured = capsys.readouterr()
        assert captured.err == ""
        texts.append(captured.out)
    assert texts[0] == texts[1] and texts[0].startswith("The ")

    # the export resumes in one process like any single-process checkpoint
    assert train_mod.main(["--resume", str(two / "export"), "--set", "train.steps=5", "--set", "train.sample_tokens=0"]) == 0
    assert list(by_step(two / "export", "train_loss")) == [5]


def test_damaged_distributed_checkpoint(runs, capsys):
    copy = runs["root"] / "damaged"
    shutil.copytree(runs["two"], copy, ignore=shutil.ignore_patterns("export"))
    shard = copy / "step_000004" / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x55
    shard.write_bytes(bytes(data))
    assert train_mod.main(["--resume", str(copy)]) == train_mod.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{shard} is corrupted" in err and "step_000002" in err


def test_sigterm_stops_every_process_with_a_checkpoint(runs):
    run = runs["root"] / "sigterm"
    cmd = torchrun_cmd("--out", str(run), "--data", str(runs["data"]),
                       *sets("train.steps=100000", "train.save_every=100000", "train.eval_every=100000"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 120
        log = run / "metrics.jsonl"
        while not (log.exists() and log.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both processes
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    step = len(by_step(run, "train_loss"))
    assert err.count(f"stopped by SIGTERM at step {step}") == 1, err[-4000:]
    saved = run / f"step_{step:06d}"
    assert load_checkpoint(saved).layout == "dcp"
    assert sorted(p.name for p in (saved / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_batch_must_split_evenly(runs):
    proc = torchrun("--out", str(runs["root"] / "uneven"), "--data", str(runs["data"]),
                    *sets("train.batch_size=3"), check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error: train.batch_size is 3" in line]
    assert lines and "multiple of 2" in lines[0] and "[rank0]: Traceback" not in proc.stderr
