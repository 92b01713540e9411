"""Token shards: reading by memory map, batching, damaged folders, and training from them."""

import json
import shutil
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmrec.data import TokenStream, default_corpus
from mmrec.data.prepare import main as prepare_main
from mmrec.data.shards import ShardError, ShardWriter, TokenShards, open_shards
from mmrec.recipes import train as train_mod

pytest.importorskip("tokenizers")


def write_stream(folder, tokens: np.ndarray, shard_tokens: int, split="train") -> TokenShards:
    writer = ShardWriter(folder, split, np.dtype(np.uint16), shard_tokens)
    for piece in np.array_split(tokens, 7):  # writes that do not line up with the shards
        writer.write(piece)
    entry = writer.close()
    return TokenShards([folder / s["file"] for s in entry["shards"]], [s["tokens"] for s in entry["shards"]],
                       np.dtype(np.uint16))


def test_shards_read_as_one_stream(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 60_000, 1001).astype(np.uint16)
    shards = write_stream(tmp_path, tokens, shard_tokens=97)
    assert len(list(tmp_path.glob("train_*.bin"))) == 11 and shards.numel() == 1001
    flat = torch.from_numpy(tokens.astype(np.int64))
    for a, b in [(0, 1001), (90, 300), (96, 97), (97, 98), (500, 500), (950, 1001)]:
        assert torch.equal(shards[a:b], flat[a:b])
    assert torch.equal(shards[-10:], flat[-10:])
    starts = torch.tensor([0, 95, 193, 980])
    assert torch.equal(shards.windows(starts, 21), flat[starts[:, None] + torch.arange(21)])
    with pytest.raises(IndexError):
        shards.read(990, 1002)


@pytest.mark.parametrize("ids", [[1, 70_000, 2], [5, -1]], ids=["too-large", "negative"])
def test_ids_that_do_not_fit_the_dtype_are_refused(tmp_path, ids):
    writer = ShardWriter(tmp_path, "train", np.dtype(np.uint16), 100)
    writer.write(np.array([1, 2, 3]))
    with pytest.raises(ShardError, match=f"token id {min(ids) if min(ids) < 0 else max(ids)} does not fit uint16"):
        writer.write(np.array(ids))
    assert writer.close()["tokens"] == 3 and (tmp_path / "train_00000.bin").read_bytes() == b"\x01\x00\x02\x00\x03\x00"


def test_batches_from_shards_equal_batches_from_a_tensor(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 50_000, 3000).astype(np.uint16)
    flat = TokenStream(torch.from_numpy(tokens.astype(np.int64)), seq_len=16, seed=5)
    mapped = TokenStream(write_stream(tmp_path, tokens, shard_tokens=250), seq_len=16, seed=5)
    assert len(flat) == len(mapped) and flat.windows_per_epoch == mapped.windows_per_epoch
    for first in (0, 7, 400, 5000):  # later positions reach into later epochs
        (x, y), (u, v) = flat.batch(first, 8), mapped.batch(first, 8)
        assert torch.equal(x, u) and torch.equal(y, v) and u.dtype == torch.long
    assert all(torch.equal(x, u) for (x, _), (u, _) in zip(flat.fixed_batches(3, 4), mapped.fixed_batches(3, 4)))


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(default_corpus().documents[:40]):
        (root / f"doc{i:02d}.txt").write_text(doc)
    out = root.parent / "shards"
    assert prepare_main(["--input", str(root), "--out", str(out), "--vocab-size", "300", "--val-fraction", "0.1",
                         "--shard-tokens", "4000", "--quiet"]) == 0
    return out


def test_damaged_folders_are_clear_errors(tmp_path, shard_folder):
    bad = tmp_path / "bad"
    shutil.copytree(shard_folder, bad)
    index = json.loads((bad / "index.json").read_text())
    first = bad / index["splits"]["train"]["shards"][0]["file"]
    first.write_bytes(first.read_bytes()[:-2])
    with pytest.raises(ShardError, match="holds 7998 bytes, but index.json says 4000 uint16 tokens"):
        open_shards(bad)
    first.unlink()
    with pytest.raises(ShardError, match="train_00000.bin is missing"):
        open_shards(bad)
    (bad / "index.json").write_text('{"format": "something else"}')
    with pytest.raises(ShardError, match="not an index of mmrec-token-shards"):
        open_shards(bad)
    with pytest.raises(ShardError, match="no index.json"):
        open_shards(tmp_path)


SMALL = ["model.n_layers=2", "train.batch_size=4", "train.seq_len=32", "train.warmup_steps=3", "train.eval_batches=2",
         "train.sample_tokens=8", "model.vocab_size=320"]


def sets(*overrides):
    return [arg for o in (*SMALL, *overrides) for arg in ("--set", o)]


def losses(run):
    return [json.loads(line).get("train_loss") for line in (run / "metrics.jsonl").read_text().splitlines()
            if "train_loss" in line]


def test_training_from_shards_resumes_exactly(tmp_path, shard_folder, monkeypatch, capsys):
    shards = open_shards(shard_folder)
    common = ["--data", str(shard_folder), *sets("train.steps=8", "train.save_every=3", "train.eval_every=4")]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train_mod.main(["--out", str(whole), *common]) == 0
    out = capsys.readouterr().out
    assert (f"data shards: {shards.train.numel():,} training and {shards.val.numel():,} validation bpe tokens "
            "(vocabulary 300)") in out
    assert losses(whole)[-1] < losses(whole)[0] - 0.5
    ckpt = whole / "step_000008"
    assert (ckpt / "tokenizer.json").is_file()
    recipe = json.loads((ckpt / "recipe.json").read_text())
    assert recipe["model"]["vocab_size"] == 320 and recipe["train"]["tokenizer"] == "bpe"

    real, calls = train_mod.lm_loss, []

    def stop_in_step_5(*args):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 5:
                signal.raise_signal(signal.SIGINT)
        return real(*args)

    with monkeypatch.context() as m:
        m.setattr(train_mod, "lm_loss", stop_in_step_5)
        assert train_mod.main(["--out", str(split), *common]) == train_mod.EXIT_SIGINT
    capsys.readouterr()
    assert train_mod.main(["--resume", str(split)]) == 0  # the data comes from the checkpoint: the shard folder
    assert "resuming from" in capsys.readouterr().out
    assert losses(split) == losses(whole)
    a, b = load_file(split / "step_000008/model.safetensors"), load_file(ckpt / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_vocabulary_smaller_than_the_shards_is_refused(tmp_path, shard_folder, capsys):
    argv = ["--out", str(tmp_path / "run"), "--data", str(shard_folder), *sets("train.steps=2", "model.vocab_size=256")]
    assert train_mod.main(argv) == 2
    err = capsys.readouterr().err
    assert "model.vocab_size is 256, but the tokenizer of" in err and "has 300 tokens" in err
    assert "--set model.vocab_size=300" in err and not (tmp_path / "run").exists()


def test_training_resets_at_document_starts(tmp_path, shard_folder, monkeypatch):
    eod = open_shards(shard_folder).eod_id
    real, seen = train_mod.document_resets, []

    def spy(input_ids, end_of_document):
        keyword = real(input_ids, end_of_document)
        seen.append((input_ids.clone(), keyword["resets"]))
        return keyword

    monkeypatch.setattr(train_mod, "document_resets", spy)
    run = tmp_path / "run"
    argv = ["--out", str(run), "--data", str(shard_folder),
            *sets("train.steps=6", "train.eval_every=3", "train.reset_at_documents=true", "train.save=false",
                  "train.seq_len=256", "train.batch_size=8")]
    assert train_mod.main(argv) == 0
    assert len(seen) == 6 + 2 * 2  # every training batch and every validation batch
    for ids, resets in seen:
        assert torch.equal(resets[:, 1:], ids[:, :-1] == eod) and not resets[:, 0].any()
    assert any(resets.any() for _, resets in seen)  # the windows do cross documents
    assert losses(run)[-1] < losses(run)[0]


def test_resets_need_shards_and_variants_that_take_them(tmp_path, shard_folder, capsys):
    text = tmp_path / "text.txt"
    text.write_text("a small corpus of plain text " * 200)
    argv = ["--out", str(tmp_path / "a"), "--data", str(text), *sets("train.steps=2", "train.reset_at_documents=true")]
    assert train_mod.main(argv) == 2
    assert "train.reset_at_documents needs token shards" in capsys.readouterr().err
    argv = ["--out", str(tmp_path / "b"), "--data", str(shard_folder),
            *sets("train.steps=2", "train.reset_at_documents=true", "model.recurrence.kind=exact",
                  "model.layer_overrides=[]")]
    assert train_mod.main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot reset at a document start" in err and "ExactRecurrence" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
