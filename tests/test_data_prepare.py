"""``python -m mmrec.data.prepare``: inputs, tokenizers, shards, the split, and bad input."""

import json
import sys
import types

import numpy as np
import pytest

from mmrec.data import default_corpus
from mmrec.data.prepare import is_validation, main
from mmrec.data.shards import open_shards, token_dtype

tokenizers = pytest.importorskip("tokenizers")

EOD = "<|endoftext|>"


@pytest.fixture(scope="module")
def docs():
    """Real prose, one document each, the last holding a literal end-of-document string."""
    texts = [d for d in default_corpus().documents[:30]]
    texts[-1] = f"a document that mentions {EOD} in its text\n"
    return texts


def write_folder(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        sub = folder / f"part{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:03d}.md").write_text(text)
    (folder / "part0" / "skip.bin").write_bytes(b"\x00\xff")
    (folder / "part1" / "zz_latin1.md").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8: skipped
    (folder / ".hidden").mkdir(exist_ok=True)
    (folder / ".hidden" / "x.md").write_text("hidden")
    return folder


def prepare(capsys, *argv, code=0) -> str:
    assert main([*argv, "--quiet"]) == code
    captured = capsys.readouterr()
    return captured.err if code else captured.out


def decode_split(shards, split):
    stream = getattr(shards, split)
    return stream[: stream.numel()].numpy()


def split_documents(ids: np.ndarray, eod_id: int) -> list[list[int]]:
    out, current = [], []
    for t in ids.tolist():
        if t == eod_id:
            out.append(current)
            current = []
        else:
            current.append(t)
    assert current == []  # the stream ends with an end-of-document token
    return out


def test_folder_with_globs_round_trips_every_document(tmp_path, docs, capsys):
    folder = write_folder(tmp_path / "in", docs)
    out = tmp_path / "shards"
    said = prepare(capsys, "--input", str(folder), "--glob", "*.md", "--out", str(out), "--vocab-size", "400",
                   "--val-fraction", "0.1")
    assert f"{len(docs)} documents" in said
    shards = open_shards(out)
    index = shards.index
    assert index["dtype"] == "uint16" and index["eod_token"] == EOD
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == 400 == index["tokenizer"]["vocab_size"]
    assert tok.token_to_id(EOD) == shards.eod_id

    # documents in walk order (part0, part1, part2; sorted names), every 10th held out
    order = sorted(range(len(docs)), key=lambda i: (i % 3, i))
    expected = {"train": [], "val": []}
    for k, i in enumerate(order):
        expected["val" if (k + 1) % 10 == 0 else "train"].append(docs[i])
    for split in ("train", "val"):
        got = split_documents(decode_split(shards, split), shards.eod_id)
        assert [tok.decode(d) for d in got] == expected[split]
        assert index["splits"][split]["documents"] == len(expected[split])
    assert index["sources"][0]["files"] == len(docs) + 1 and index["sources"][0]["skipped_files"] == 1
    assert index["input_bytes"] == sum(len(d.encode()) for d in docs)

    # the literal end-of-document string is text, not the end token
    [literal] = [d for split in ("train", "val") for d in split_documents(decode_split(shards, split), shards.eod_id)
                 if "mentions" in tok.decode(d)]
    assert f"mentions {EOD} in" in tok.decode(literal) and len(literal) > 10
    # and mmrec's own tokenizer of the folder encodes it the same way (no end token from text)
    assert shards.tokenizer().encode(docs[-1]) == literal


def test_text_file_and_jsonl_and_byte_tokenizer(tmp_path, docs, capsys):
    (tmp_path / "one.txt").write_text(docs[0])
    lines = [json.dumps({"id": i, "content": d}) for i, d in enumerate(docs[1:12])]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n")
    out = tmp_path / "shards"
    prepare(capsys, "--input", str(tmp_path / "one.txt"), "--input", str(tmp_path / "rows.jsonl"),
            "--text-field", "content", "--tokenizer", "byte", "--out", str(out), "--val-fraction", "0.25")
    shards = open_shards(out)
    assert shards.vocab_size == 257 and shards.index["documents"] == 12
    tok = shards.tokenizer()
    val = split_documents(decode_split(shards, "val"), shards.eod_id)
    assert [tok.decode(d) for d in val] == [docs[3], docs[7], docs[11]]
    train = decode_split(shards, "train")
    # bytes alone: one token a byte, plus one end token a document
    assert train.size == sum(len(docs[i].encode()) + 1 for i in range(12) if i not in (3, 7, 11))


def test_shards_have_a_fixed_size_and_the_output_is_deterministic(tmp_path, docs, capsys):
    folder = write_folder(tmp_path / "in", docs)
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        prepare(capsys, "--input", str(folder), "--out", str(out), "--vocab-size", "300", "--shard-tokens", "5000",
                "--batch-bytes", "20000", "--val-fraction", "0.1")
    index = json.loads((a / "index.json").read_text())
    shards = index["splits"]["train"]["shards"]
    assert len(shards) > 3
    assert all(s["tokens"] == 5000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 5000
    assert all((a / s["file"]).stat().st_size == 2 * s["tokens"] for s in shards)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    for s in shards:
        assert (a / s["file"]).read_bytes() == (b / s["file"]).read_bytes()
    # the same ids whatever the batch and shard sizes
    c = tmp_path / "c"
    prepare(capsys, "--input", str(folder), "--out", str(c), "--val-fraction", "0.1", "--tokenizer",
            str(a / "tokenizer.json"))
    assert np.array_equal(decode_split(open_shards(a), "train"), decode_split(open_shards(c), "train"))


def test_existing_output_is_never_overwritten_silently(tmp_path, docs, capsys):
    folder = write_folder(tmp_path / "in", docs)
    out = tmp_path / "shards"
    args = ["--input", str(folder), "--out", str(out), "--tokenizer", "byte"]
    prepare(capsys, *args, "--val-fraction", "0.1")
    before = (out / "train_00000.bin").read_bytes()
    err = prepare(capsys, *args, "--val-fraction", "0.5", code=2)
    assert "already exists" in err and "--overwrite" in err
    assert (out / "train_00000.bin").read_bytes() == before
    prepare(capsys, *args, "--val-fraction", "0.5", "--overwrite")
    assert open_shards(out).index["val_fraction"] == 0.5

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    err = prepare(capsys, "--input", str(folder), "--out", str(other), "--tokenizer", "byte", "--overwrite",
                  "--val-fraction", "0.1", code=2)
    assert "holds other files" in err and (other / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "mine", "shards"]  # no work folder left


def test_a_loaded_tokenizer_is_used_as_is(tmp_path, docs, capsys):
    words = {f"w{i}": i for i in range(70_000)}
    words.update({"[UNK]": 70_000, "</s>": 70_001})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "big.json"))
    (tmp_path / "a.txt").write_text("w1 w69999 w5 nope\n")
    (tmp_path / "b.txt").write_text("w7\n")
    out = tmp_path / "shards"
    err = prepare(capsys, "--input", str(tmp_path), "--glob", "*.txt", "--tokenizer", str(tmp_path / "big.json"),
                  "--out", str(out), "--val-fraction", "0.5", code=2)
    assert "no token '<|endoftext|>'" in err and "--eod-token" in err
    prepare(capsys, "--input", str(tmp_path), "--glob", "*.txt", "--tokenizer", str(tmp_path / "big.json"),
            "--eod-token", "</s>", "--out", str(out), "--val-fraction", "0.5")
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "big.json").read_bytes()
    shards = open_shards(out)
    assert shards.index["dtype"] == "uint32" == token_dtype(70_002).name
    assert decode_split(shards, "train").tolist() == [1, 69999, 5, 70_000, 70_001]
    assert decode_split(shards, "val").tolist() == [7, 70_001]


def test_datasets_on_disk(tmp_path, docs, capsys, monkeypatch):
    """The wiring, through a stand-in ``datasets``; the real package where it is installed."""

    class FakeDataset:
        column_names = ("text", "n")

        def select_columns(self, columns):
            assert columns == ["text"]
            return self

        def iter(self, batch_size):
            yield {"text": docs[:3]}
            yield {"text": [None, docs[3]]}

    class FakeDict(dict):
        pass

    fake = types.SimpleNamespace(DatasetDict=FakeDict, load_from_disk=lambda path: FakeDict(train=FakeDataset()))
    saved = tmp_path / "ds"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text('{"splits": ["train"]}')
    out = tmp_path / "shards"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "datasets", None)  # not installed
        err = prepare(capsys, "--input", str(saved), "--tokenizer", "byte", "--out", str(out), code=2)
        assert "needs the 'datasets' package: pip install datasets" in err
        m.setitem(sys.modules, "datasets", fake)
        err = prepare(capsys, "--input", str(saved), "--tokenizer", "byte", "--out", str(out), "--dataset-split", "test", code=2)
        assert "has the splits train, not 'test'" in err
        err = prepare(capsys, "--input", str(saved), "--tokenizer", "byte", "--out", str(out), "--text-field", "body", code=2)
        assert "no column 'body'" in err and "--text-field" in err
        prepare(capsys, "--input", str(saved), "--tokenizer", "byte", "--out", str(out), "--val-fraction", "0.5")
    shards = open_shards(out)
    assert shards.index["documents"] == 4 and shards.index["sources"][0]["kind"] == "dataset"

    datasets = pytest.importorskip("datasets")
    real = tmp_path / "real"
    datasets.Dataset.from_dict({"text": docs[:6]}).save_to_disk(str(real))
    prepare(capsys, "--input", str(real), "--tokenizer", "byte", "--out", str(tmp_path / "real_shards"), "--val-fraction", "0.5")
    val = open_shards(tmp_path / "real_shards")
    tok = val.tokenizer()
    assert [tok.decode(d) for d in split_documents(decode_split(val, "val"), val.eod_id)] == [docs[1], docs[3], docs[5]]


@pytest.mark.parametrize(
    "setup, argv, message",
    [
        (lambda p: None, ["--input", "{p}/missing"], "no such file or folder"),
        (lambda p: (p / "x.md").write_text("x"), ["--input", "{p}", "--glob", "*.py"], "no file under it matches *.py"),
        (lambda p: (p / "r.jsonl").write_text('{"body": "x"}\n'), ["--input", "{p}/r.jsonl"], "r.jsonl:1 has no 'text' field (it has: body)"),
        (lambda p: (p / "r.jsonl").write_text('{"text": "x"}\n{oops\n'), ["--input", "{p}/r.jsonl"], "r.jsonl:2 is not a JSON line"),
        (lambda p: (p / "b.txt").write_bytes(b"ok\xff"), ["--input", "{p}/b.txt"], "is not UTF-8"),
        (lambda p: (p / "e.txt").write_text(" \n"), ["--input", "{p}/e.txt"], "hold no text"),
        (lambda p: (p / "a.txt").write_text("one document"), ["--input", "{p}/a.txt"], "none for validation"),
        (lambda p: (p / "a.txt").write_text("x"), ["--input", "{p}/a.txt", "--vocab-size", "100"], "at least 257"),
        (lambda p: (p / "a.txt").write_text("x"), ["--input", "{p}/a.txt", "--val-fraction", "1"], "--val-fraction must be in (0, 1)"),
    ],
    ids=["missing", "no-match", "jsonl-field", "jsonl-syntax", "not-utf8", "empty", "no-val", "tiny-vocab", "val-fraction"],
)
def test_bad_input_is_a_clear_error(tmp_path, capsys, setup, argv, message):
    (tmp_path / "in").mkdir()
    setup(tmp_path / "in")
    err = prepare(capsys, *[a.format(p=tmp_path / "in") for a in argv], "--out", str(tmp_path / "out"), code=2)
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_validation_documents_are_evenly_spread():
    held = [i for i in range(1000) if is_validation(i, 0.01)]
    assert held == list(range(99, 1000, 100))
    assert sum(is_validation(i, 0.3) for i in range(1000)) == 300


def test_long_documents_encode_in_pieces_to_the_same_ids(tmp_path, capsys):
    from mmrec.data.prepare import can_cut, encode_documents

    text = default_corpus().text[:200_000]  # several pieces of 64K characters
    (tmp_path / "in.txt").write_text(text)
    (tmp_path / "short.txt").write_text("another document\n")
    prepare(capsys, "--input", str(tmp_path), "--glob", "*.txt", "--out", str(tmp_path / "s"), "--vocab-size", "500",
            "--val-fraction", "0.5")
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "s" / "tokenizer.json"))
    tok.encode_special_tokens = True
    assert can_cut(tok)
    whole, cut = encode_documents(tok, [text], 0), encode_documents(tok, [text], 0, cut=True)
    assert np.array_equal(whole[0], cut[0]) and whole[0][-1] == 0 and whole[0].size > 10_000
    assert np.array_equal(decode_split(open_shards(tmp_path / "s"), "train"), whole[0])


def test_the_trained_tokenizer_is_mmrec_train_bpe_with_the_end_token(tmp_path, docs, capsys):
    from mmrec.tokenizer import train_bpe

    folder = write_folder(tmp_path / "in", docs)
    prepare(capsys, "--input", str(folder), "--glob", "*.md", "--out", str(tmp_path / "s"), "--vocab-size", "400",
            "--val-fraction", "0.1")
    order = sorted(range(len(docs)), key=lambda i: (i % 3, i))  # the reading order
    expected = train_bpe([docs[i] for i in order], 400, special_tokens=[EOD])
    assert expected.backend.token_to_id(EOD) == 0
    assert json.loads((tmp_path / "s" / "tokenizer.json").read_text()) == json.loads(expected.backend.to_str())


def test_token_ids_past_the_vocabulary_count_are_not_wrapped(tmp_path, capsys):
    """A tokenizer whose ids have gaps: its shards' dtype must hold the highest id."""
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "</s>": 1, "hello": 70_000}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "gaps.json"))
    (tmp_path / "a.txt").write_text("hello hello\n")
    (tmp_path / "b.txt").write_text("hello x\n")
    out = tmp_path / "shards"
    prepare(capsys, "--input", str(tmp_path), "--glob", "*.txt", "--tokenizer", str(tmp_path / "gaps.json"),
            "--eod-token", "</s>", "--out", str(out), "--val-fraction", "0.5")
    shards = open_shards(out)
    assert shards.index["dtype"] == "uint32" and shards.vocab_size == 70_001
    assert decode_split(shards, "train").tolist() == [70_000, 70_000, 1]
    assert decode_split(shards, "val").tolist() == [70_000, 0, 1]
    assert shards.tokenizer().vocab_size == 70_001


def test_lone_surrogates_in_jsonl_are_replaced_and_counted(tmp_path, docs, capsys):
    rows = [{"text": docs[0]}, {"text": "bad \ud800 here"}, {"text": docs[1]}, {"text": "\udfff twice \udc00"}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # valid JSON, \u escapes
    out = tmp_path / "shards"
    assert main(["--input", str(tmp_path / "r.jsonl"), "--tokenizer", "byte", "--out", str(out),
                 "--val-fraction", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "replaced lone surrogates with U+FFFD in 2 documents" in err and f"{tmp_path / 'r.jsonl'}:2" in err
    shards = open_shards(out)
    assert shards.index["sources"][0]["surrogates_replaced"] == 2
    tok = shards.tokenizer()
    got = [tok.decode(d) for split in ("train", "val") for d in split_documents(decode_split(shards, split), shards.eod_id)]
    assert sorted(got) == sorted([docs[0], "bad \ufffd here", docs[1], "\ufffd twice \ufffd"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shard-tokens", "0"], "--shard-tokens must be at least 1, got 0"),
        (["--shard-tokens", "-3"], "--shard-tokens must be at least 1, got -3"),
        (["--batch-bytes", "0"], "--batch-bytes must be at least 1, got 0"),
        (["--tokenizer-train-bytes", "-1"], "--tokenizer-train-bytes must be 0 (all) or more, got -1"),
        (["--vocab-size", "256"], "--vocab-size must be at least 257"),
        (["--val-fraction", "0"], "--val-fraction must be in (0, 1)"),
        (["--val-fraction", "nan"], "--val-fraction must be in (0, 1)"),
    ],
    ids=["shard-tokens-0", "shard-tokens-negative", "batch-bytes", "train-bytes", "vocab-size", "val-0", "val-nan"],
)
def test_numeric_options_are_checked_before_any_reading(tmp_path, capsys, monkeypatch, argv, message):
    import mmrec.data.prepare as prep

    def no_reading(*args, **kwargs):
        raise AssertionError("the inputs were read before the options were checked")

    monkeypatch.setattr(prep, "read_documents", no_reading)
    (tmp_path / "a.txt").write_text("some text\n")
    err = prepare(capsys, "--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), *argv, code=2)
    assert err.startswith("error: ") and message in err and "Traceback" not in err
