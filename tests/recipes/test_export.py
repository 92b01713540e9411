"""``python -m mmrec.recipes.export --hf``: a training checkpoint as a transformers folder,
loaded back by transformers, by mmrec, and scored by lm-evaluation-harness."""

import json
import os
import subprocess
import sys

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
    assert AutoTokenizer.from_pretrained(exported)(text).input_ids == ByteTokenizer().encode(text)


def test_export_loads_back_into_mmrec(run, exported):
    _, model = checkpoint_model(run)
    recipe, back = export_mod.load_hf(exported)
    assert recipe == mmrec.recipes.load(load_checkpoint(run).recipe)
    mine, theirs = model.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_export_never_writes_into_a_folder_that_holds_files(run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export_mod.main(["--hf", str(run), str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
    assert export_mod.main(["--hf", str(run), str(out), "--overwrite"]) == 0
    assert (out / "config.json").is_file() and (out / "notes.txt").read_text() == "mine"
    assert export_mod.main(["--hf", str(tmp_path / "nothing"), str(tmp_path / "new")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "new").exists()


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
