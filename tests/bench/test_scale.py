"""The scale benchmark: the tiny pair trained end to end on CPU from byte shards, the loss
by position against a float64 reference, and the options refused before any training."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import mmrec
from mmrec.bench.__main__ import main
from mmrec.bench.scale import document_window_starts, loss_by_position, segments
from mmrec.data import TokenStream, default_corpus
from mmrec.data import prepare as prepare_mod
from mmrec.data.shards import open_shards

pytest.importorskip("tokenizers")

SEQ_LEN = 32
TOY = ["model.vocab_size=257", "model.n_layers=1", "train.batch_size=2", f"train.seq_len={SEQ_LEN}",
       "train.eval_batches=1", "train.warmup_steps=1", "train.sample_tokens=0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    texts = root / "texts"
    texts.mkdir()
    for i, doc in enumerate(default_corpus().documents[:20]):
        (texts / f"doc{i:02d}.txt").write_text(doc)
    out = root / "shards"
    assert prepare_mod.main(["--input", str(texts), "--out", str(out), "--tokenizer", "byte",
                             "--val-fraction", "0.2", "--quiet"]) == 0
    return out


def sets(*overrides):
    return [x for o in overrides for x in ("--set", o)]


def test_the_tiny_pair_trains_on_the_same_batches_and_is_scored_by_position(shards, tmp_path):
    out, chart = tmp_path / "scale.json", tmp_path / "scale.png"
    code = main(["scale", "--data", str(shards), "--recipes", "tiny", "transformer-tiny", "--tokens", "300",
                 "--evals", "2", "--lengths", "1", "2", "4", "--eval-windows", "3", "--runs", str(tmp_path / "runs"),
                 "--device", "cpu", *sets(*TOY), "--out", str(out), "--plot", str(chart)])
    assert code == 0
    payload = json.loads(out.read_text())
    steps = math.ceil(300 / (2 * SEQ_LEN))  # 5 updates of 64 tokens
    assert payload["complete"] and payload["same_batches"] is True
    assert (payload["steps"], payload["tokens"], payload["seq_len"]) == (steps, steps * 2 * SEQ_LEN, SEQ_LEN)
    assert payload["data_fingerprint"] == open_shards(shards).fingerprint
    rows = {r["recipe"]: r for r in payload["results"]}
    assert set(rows) == {"tiny", "transformer-tiny"}
    for r in rows.values():
        assert r["exit_code"] == 0 and r["step"] == steps and r["parameters"] > 0
        assert [p["step"] for p in r["val_curve"]] == [2, 4, 5]  # every steps // evals, and the last
        assert all(0 < p["val_loss"] < 10 and p["tokens"] == p["step"] * 2 * SEQ_LEN for p in r["val_curve"])
        batches = r["batches"]
        assert batches["fingerprint"] == payload["data_fingerprint"] and batches["tokens_seen"] == payload["tokens"]
        assert 0 < r["data_time"]["median_data_s"] < r["data_time"]["median_step_s"]
        assert "train_loss_noise" in r and r["train_loss_noise"] is None  # 5 steps: no full 11-step window
        assert [e["multiple"] for e in r["loss_by_position"]] == [1, 2, 4]
        for entry in r["loss_by_position"]:
            assert "error" not in entry and entry["window_starts"] == "documents" and entry["windows"] > 0
            assert len(entry["bucket_loss"]) == entry["length"] // (SEQ_LEN // 8)
            assert all(0 < v < 10 for v in entry["bucket_loss"])
            assert list(entry["segment_loss"]) == [f"{a}-{b}x" for a, b in segments(entry["multiple"])]
            assert all(0 < v < 10 for v in entry["segment_loss"].values())
    assert rows["tiny"]["batches"]["read"] is not None  # the trainers' own record of what they read
    assert rows["tiny"]["batches"] == rows["transformer-tiny"]["batches"]  # the same tokens in the same order
    assert rows["tiny"]["val_curve"] != rows["transformer-tiny"]["val_curve"]  # two models, not one run twice
    assert chart.read_bytes().startswith(b"\x89PNG")


def test_segments_double_from_the_training_length():
    assert segments(1) == [(0, 1)]
    assert segments(3) == [(0, 1), (1, 2), (2, 3)]
    assert segments(8) == [(0, 1), (1, 2), (2, 4), (4, 8)]


@pytest.mark.parametrize("recipe", ["tiny", "transformer-tiny"])
def test_loss_by_position_matches_a_float64_reference_whole_or_streamed(shards, recipe):
    model = mmrec.build(recipe, ["model.vocab_size=257", "model.n_layers=2"]).eval()
    val = open_shards(shards).val
    [whole] = loss_by_position(model, val, SEQ_LEN, [3], 2, "cpu")
    model.stream_piece = SEQ_LEN  # pieces of the training length carrying the state: one pass
    [streamed] = loss_by_position(model, val, SEQ_LEN, [3], 2, "cpu")

    [(inputs, targets)] = TokenStream(val, 3 * SEQ_LEN, 0).fixed_batches(1, 2)
    model.stream_piece = 1 << 20
    with torch.no_grad():
        logits = model.double()(inputs, return_state=False).logits
    reference = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(0)  # [3 x SEQ_LEN]
    assert torch.allclose(torch.tensor(whole["bucket_loss"], dtype=torch.float64),
                          reference.view(-1, SEQ_LEN // 8).mean(1), atol=1e-4)
    assert whole["segment_loss"]["2-3x"] == pytest.approx(reference[2 * SEQ_LEN :].mean().item(), abs=1e-4)
    assert streamed["bucket_loss"] == pytest.approx(whole["bucket_loss"], abs=1e-4)


def test_a_length_the_model_cannot_run_is_reported_not_raised(shards):
    model = mmrec.build("transformer-tiny", ["model.vocab_size=257", "model.n_layers=1"]).eval()

    class Limited(torch.nn.Module):  # a positional scheme with a hard maximum length
        def forward(self, ids, **kwargs):
            if ids.shape[1] > 2 * SEQ_LEN:
                raise ValueError(f"positions end at {2 * SEQ_LEN}")
            return model(ids, **kwargs)

    val = open_shards(shards).val
    rows = loss_by_position(Limited(), val, SEQ_LEN, [1, 4, val.numel()], 2, "cpu")
    assert "bucket_loss" in rows[0]
    assert rows[1]["error"] == f"ValueError: positions end at {2 * SEQ_LEN}"
    assert "fewer than" in rows[2]["error"]  # a window longer than the validation split


@pytest.mark.parametrize("argv,message", [
    (sets("train.seq_len=64") + ["--recipes", "tiny", "small"], "different batches"),
    (sets("train.steps=10"), "--tokens sets train.steps"),
    (["--recipes", "tiny", "tiny"], "share a run folder"),
    (["--lengths", "0"], "at least 1"),
])
def test_options_that_cannot_compare_are_refused_before_training(shards, tmp_path, capsys, argv, message):
    argv = ["--recipes", "tiny", "transformer-tiny", *argv] if "--recipes" not in argv else argv
    assert main(["scale", "--data", str(shards), "--tokens", "100", "--runs", str(tmp_path / "runs"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_run_folder_in_use_is_refused(shards, tmp_path, capsys):
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "metrics.jsonl").write_text("{}\n")
    assert main(["scale", "--data", str(shards), "--recipes", "tiny", "transformer-tiny", "--tokens", "100",
                 "--runs", str(tmp_path / "runs")]) == 2
    assert "already hold a run" in capsys.readouterr().err


def test_text_data_is_refused_with_the_command_that_makes_shards(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("some text\n")
    assert main(["scale", "--data", str(tmp_path / "corpus.txt"), "--tokens", "100", "--runs", str(tmp_path / "r")]) == 2
    assert "python -m mmrec.data.prepare" in capsys.readouterr().err


def test_the_batches_read_come_from_the_trainers_log():
    from mmrec.bench.scale import read_batches

    log = [{"step": 1, "train_batch_crc": "0000abcd"}, {"step": 2, "train_batch_crc": "12345678"}]
    assert read_batches(log) == read_batches(list(reversed(log)))  # in step order
    assert read_batches(log) != read_batches([log[0], {"step": 2, "train_batch_crc": "12345679"}])
    assert read_batches([log[0], {"step": 2}]) is None and read_batches([]) is None


def test_document_windows_begin_a_document_and_stay_inside_it():
    eod = 0
    docs = [[5] * 3, [6] * 10, [7] * 4, [8] * 12, [9] * 9]  # token values name the document
    tokens = torch.tensor([t for doc in docs for t in [*doc, eod]])
    starts = document_window_starts(tokens, eod, 8, 16)  # windows of 9 tokens: documents of 8+ tokens
    assert [tokens[s].item() for s in starts] == [6, 8, 9]
    for s in starts.tolist():
        window = tokens[s : s + 9]
        assert (window[:-1] == window[0]).all() and window[-1].item() in (window[0].item(), eod)
        assert s == 0 or tokens[s - 1].item() == eod
    assert [tokens[s].item() for s in document_window_starts(tokens, eod, 8, 2)] == [6, 9]  # spread evenly
    assert [tokens[s].item() for s in document_window_starts(tokens, eod, 12, 4)] == [8]  # its end token the last target
    assert document_window_starts(tokens, eod, 13, 4).numel() == 0
    # a split whose last document has no end-of-document token: it ends with the split
    assert document_window_starts(torch.tensor([5, 5, 5, 5]), eod, 3, 4).tolist() == [0]
    assert document_window_starts(torch.tensor([5, 5, 5, 5]), eod, 4, 4).numel() == 0
    assert document_window_starts(torch.tensor([0, 7, 7, 7, 0]), eod, 3, 4).tolist() == [1]  # an empty first document
    # the ends are found a piece of the split at a time (bounded memory); any piece gives the same
    for piece in (1, 3, 7, tokens.numel()):
        assert torch.equal(document_window_starts(tokens, eod, 8, 16, piece=piece), starts)


def test_loss_by_position_in_documents_matches_a_float64_reference(shards):
    model = mmrec.build("tiny", ["model.vocab_size=257", "model.n_layers=2"]).eval()
    data = open_shards(shards)
    val = data.val
    [row] = loss_by_position(model, val, SEQ_LEN, [2], 3, "cpu", eod_id=data.eod_id)
    tokens = val.windows(torch.zeros(1, dtype=torch.long), val.numel())[0]
    starts = document_window_starts(tokens, data.eod_id, 2 * SEQ_LEN, 3)
    assert row["window_starts"] == "documents" and row["windows"] == starts.numel() > 0
    windows = torch.stack([tokens[s : s + 2 * SEQ_LEN + 1] for s in starts.tolist()])
    with torch.no_grad():
        logits = model.double()(windows[:, :-1], return_state=False).logits
    reference = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(0)
    assert row["segment_loss"]["1-2x"] == pytest.approx(reference[SEQ_LEN:].mean().item(), abs=1e-4)
    [none] = loss_by_position(model, val, SEQ_LEN, [val.numel()], 3, "cpu", eod_id=data.eod_id)
    assert none["windows"] == 0 and "no validation document" in none["error"]


def test_loss_noise_is_the_spread_around_the_local_trend():
    """A straight trend has no noise; steps alternating +-e around it leave residuals of
    e (1 + 1/11), since each 11-step mean keeps e/11 of the wiggle, of the other sign."""
    import math

    from mmrec.bench.scale import loss_noise

    trend = [5.0 - 0.01 * i for i in range(60)]
    assert loss_noise(trend) < 1e-12
    wiggle = [x + (0.1 if i % 2 else -0.1) for i, x in enumerate(trend)]
    assert math.isclose(loss_noise(wiggle), 0.1 * 12 / 11, rel_tol=0.02)
    assert loss_noise(trend[:20]) is None  # the second half is shorter than a window
