import pytest
import torch

from mmrec.data import default_corpus
from mmrec.tokenizer import (
    ByteTokenizer,
    TokenizerError,
    load_tokenizer,
    pieces,
    train_bpe,
)

TEXT = "Grüße, 世界! The quick brown fox.\n\n  Indented line\nlast"


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert max(ids) < 256 and len(ids) == len(TEXT.encode())
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids[:-1] + [0xE4]) .endswith("\ufffd")  # a cut multibyte char does not raise
    stream = tok.encode_corpus(["ab", "c"])
    assert stream.dtype == torch.uint8 and tok.decode(stream.tolist()) == "ab\n\nc"
    assert load_tokenizer("byte").vocab_size == 256


def test_pieces_cut_only_where_the_pre_tokenizer_has_a_boundary():
    text = "alpha beta\ngamma\n\n\ndelta  \nepsilon\nz" * 50
    parts = pieces(text, size=37)
    assert "".join(parts) == text and len(parts) > 10
    for p in parts[:-1]:
        assert p.endswith("\n") and not p[-2].isspace()


@pytest.fixture(scope="module")
def bpe():
    pytest.importorskip("tokenizers")
    return train_bpe(default_corpus().documents[:40], vocab_size=400)


def test_bpe_trains_saves_and_loads(bpe, tmp_path):
    assert 256 < bpe.vocab_size <= 400
    ids = bpe.encode(TEXT)
    assert bpe.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode())
    bpe.save(tmp_path)
    again = load_tokenizer("bpe", tmp_path)
    assert again.vocab_size == bpe.vocab_size and again.encode(TEXT) == ids


def test_bpe_corpus_encoding_matches_whole_text_encoding(bpe):
    docs = default_corpus().documents[:30]
    stream = bpe.encode_corpus(docs)
    assert stream.dtype == torch.int32
    assert stream.tolist() == bpe.encode("\n\n".join(docs))


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer file missing"):
        load_tokenizer("bpe", tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load the tokenizer"):
        load_tokenizer("bpe", tmp_path)
    with pytest.raises(TokenizerError, match="at least 256"):
        train_bpe(["abc"], vocab_size=100)
    with pytest.raises(TokenizerError, match="at least 257 .the 256 bytes and 1 special token"):
        train_bpe(["abc"], vocab_size=256, special_tokens=["<|endoftext|>"])
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        load_tokenizer("words")


def test_special_tokens_never_come_from_the_text(tmp_path):
    """An end-of-document token in the vocabulary is only ever placed by the caller: a
    literal ``<|endoftext|>`` in text is ordinary text, before and after saving."""
    pytest.importorskip("tokenizers")
    eod = "<|endoftext|>"
    tok = train_bpe(default_corpus().documents[:20], vocab_size=300, special_tokens=[eod])
    assert tok.backend.token_to_id(eod) == 0 and tok.vocab_size == 300
    text = f"one document {eod} and on"
    ids = tok.encode(text)
    assert 0 not in ids and len(ids) > len(eod) // 2
    assert tok.decode(ids) == text
    assert tok.encode_corpus([text, text]).tolist() == tok.encode(f"{text}\n\n{text}")
    tok.save(tmp_path)
    assert load_tokenizer("bpe", tmp_path).encode(text) == ids
