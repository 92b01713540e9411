"""``python -m mmrec.recipes.export --hf``: a training checkpoint as a transformers folder,
loaded back by transformers, by mmrec, and scored by lm-evaluation-harness."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmrec
from mmrec.checkpoint import load_checkpoint
from mmrec.data import default_corpus
from mmrec.recipes import export as export_mod
from mmrec.recipes import train as train_mod
from mmrec.tokenizer import ByteTokenizer

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer

SETTINGS = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "model.chunk_size=8",
            "model.memory.slots=16", "model.memory.dim=16", "train.steps=2", "train.batch_size=2",
            "train.seq_len=32", "train.warmup_steps=1", "train.eval_batches=1", "train.sample_tokens=0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished two-step training run of a tiny MM-Rec model."""
    root = tmp_path_factory.mktemp("export")
    data = root / "corpus.txt"
    data.write_text(default_corpus().text[:20_000])
    run = root / "run"
    args = ["--out", str(run), "--data", str(data)] + [a for s in SETTINGS for a in ("--set", s)]
    assert train_mod.main(args) == 0
    return run


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory):
    """A two-step training run of a tiny MM-Rec model on token shards (a BPE of 300 tokens)."""
    from mmrec.data import prepare

    root = tmp_path_factory.mktemp("shard-export")
    documents = [d for d in default_corpus().text[:20_000].split("\n\n") if d.strip()]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    assert prepare.main(["--input", str(root / "docs.jsonl"), "--out", str(root / "shards"), "--vocab-size", "300",
                         "--val-fraction", "0.2", "--quiet"]) == 0
    args = ["--out", str(root / "run"), "--data", str(root / "shards")]
    args += [a for s in [*SETTINGS, "model.vocab_size=300"] for a in ("--set", s)]
    assert train_mod.main(args) == 0
    return root / "run", json.loads((root / "shards" / "index.json").read_text())


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "tiny-hf"
    assert export_mod.main(["--hf", str(run), str(out)]) == 0
    return out


def checkpoint_model(run):
    checkpoint = load_checkpoint(run)
    model = mmrec.build(str(checkpoint.recipe_file))
    checkpoint.load_model(model)
    return checkpoint, model.eval()


def test_export_loads_in_transformers_with_the_checkpoints_weights(run, exported):
    import mmrec.hf  # noqa: F401 - registers the Auto classes

    checkpoint, model = checkpoint_model(run)
    assert {"config.json", "model.safetensors", "tokenizer.json", "modeling_mmrec.py"} <= {p.name for p in exported.iterdir()}
    assert json.loads((exported / "config.json").read_text())["recipe"] == checkpoint.recipe
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids).logits)
    text = "Exported: é and 日本."
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer(text).input_ids == ByteTokenizer().encode(text)
    # raw text has no end-of-document token: the NUL byte pads, and generate stops only at its length
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == 0
    assert hf.generation_config.pad_token_id == 0 and hf.generation_config.eos_token_id is None


def test_export_of_a_run_on_token_shards_ends_text_with_their_eod_token(shard_run, tmp_path):
    """Each document the model saw ended with the shards' end-of-document token: the
    tokenizer starts, ends and pads text with it, and generate stops at it."""
    import mmrec.hf  # noqa: F401 - registers the Auto classes

    run, index = shard_run
    out = tmp_path / "hf"
    assert export_mod.main(["--hf", str(run), str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == index["eod_token"] == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == index["eod_id"]
    generation = AutoModelForCausalLM.from_pretrained(out).generation_config
    assert generation.eos_token_id == generation.pad_token_id == index["eod_id"]


def test_export_loads_back_into_mmrec(run, exported):
    _, model = checkpoint_model(run)
    recipe, back = export_mod.load_hf(exported)
    assert recipe == mmrec.recipes.load(load_checkpoint(run).recipe)
    mine, theirs = model.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def one_error_line(capsys) -> str:
    """The one ``error:`` line the command ended with (a progress bar of transformers aside)."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err and err.count("error") == 1, err
    return lines[-1]


def test_export_writes_into_an_empty_folder_or_over_an_earlier_export_only(run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert export_mod.main(["--hf", str(run), str(taken)]) == 2
    assert "is not empty" in one_error_line(capsys)
    assert export_mod.main(["--hf", str(run), str(taken), "--overwrite"]) == 2
    assert "not an mmrec export" in one_error_line(capsys)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and (taken / "notes.txt").read_text() == "mine"
    other = tmp_path / "other-model"  # a folder of another model: its config.json is the user's
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert export_mod.main(["--hf", str(run), str(other), "--overwrite"]) == 2
    assert "not an mmrec export" in one_error_line(capsys)
    assert json.loads((other / "config.json").read_text()) == {"model_type": "llama"}

    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_mod.main(["--hf", str(run), str(empty)]) == 0
    capsys.readouterr()
    assert export_mod.main(["--hf", str(run), str(empty)]) == 2  # an earlier export, without --overwrite
    assert "is not empty" in one_error_line(capsys)
    assert export_mod.main(["--hf", str(run), str(empty), "--overwrite"]) == 0
    capsys.readouterr()
    assert export_mod.load_hf(empty)[0] == mmrec.recipes.load(load_checkpoint(run).recipe)
    (empty / "NOTES.md").write_text("mine")  # the user's file in an earlier export: not replaced
    assert export_mod.main(["--hf", str(run), str(empty), "--overwrite"]) == 2
    assert "NOTES.md" in one_error_line(capsys) and (empty / "NOTES.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "other-model", "taken"]  # nothing left beside


def test_export_failures_are_one_line_and_leave_no_folder(run, tmp_path, capsys, monkeypatch):
    assert export_mod.main(["--hf", str(tmp_path / "nothing"), str(tmp_path / "new")]) == 2
    one_error_line(capsys)
    # the tokenizer cannot be exported as asked: it has no such end-of-document token
    assert export_mod.main(["--hf", str(run), str(tmp_path / "a" / "out"), "--eod-token", "</s>"]) == 2
    assert "'</s>'" in one_error_line(capsys)
    # the OS refuses: the folder's parent is a file
    (tmp_path / "file").write_text("x")
    assert export_mod.main(["--hf", str(run), str(tmp_path / "file" / "out")]) == 2
    assert str(tmp_path / "file") in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]

    # a write that fails halfway (a full disk) leaves nothing half-written, and an earlier export as it was
    import mmrec.hf

    assert export_mod.main(["--hf", str(run), str(tmp_path / "done")]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir()}

    def disk_full(self, folder, *args, **kwargs):
        Path(folder).mkdir()
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mmrec.hf.MMRecForCausalLM, "save_pretrained", disk_full)
    assert export_mod.main(["--hf", str(run), str(tmp_path / "b" / "out")]) == 2
    assert "No space left on device" in one_error_line(capsys)
    assert export_mod.main(["--hf", str(run), str(tmp_path / "done"), "--overwrite"]) == 2
    assert "No space left on device" in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done", "file"]


def test_load_hf_refuses_a_folder_of_another_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(export_mod.ExportError, match="not the config of an mmrec model"):
        export_mod.load_hf(tmp_path)


@pytest.mark.slow
def test_lm_eval_scores_a_local_loglikelihood_task(run, exported, tmp_path):
    """``lm_eval --model hf`` in a fresh process (which never imported mmrec.hf: the
    folder's auto_map and trust_remote_code load the classes), offline, on a task file and
    data written here; its log-likelihoods are the ones mmrec's own model gives."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    docs = [{"context": "The model", "continuation": " reads"}, {"context": "def", "continuation": " f(x):"},
            {"context": "Hello", "continuation": " world"}]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "mmrec_local.yaml").write_text(
        "task: mmrec_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\n'
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    results = tmp_path / "results"
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf",
         "--model_args", f"pretrained={exported},trust_remote_code=True", "--tasks", "mmrec_local",
         "--include_path", str(tmp_path), "--device", "cpu", "--batch_size", "2",
         "--output_path", str(results), "--log_samples"],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    samples = [json.loads(line) for f in results.rglob("samples_mmrec_local_*.jsonl") for line in f.read_text().splitlines()]
    assert len(samples) == len(docs)

    _, model = checkpoint_model(run)
    tokenizer = ByteTokenizer()
    for sample in samples:
        doc = sample["doc"]
        context, continuation = tokenizer.encode(doc["context"]), tokenizer.encode(doc["continuation"])
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logprobs = model(ids[:, :-1]).logits.log_softmax(-1)[0, len(context) - 1:]
        expected = logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item()
        assert float(sample["resps"][0][0][0]) == pytest.approx(expected, abs=1e-4)
