from fractions import Fraction

import pytest
import torch

from mmrec.data import (
    DataError,
    TokenStream,
    default_corpus,
    fingerprint,
    load_corpus,
    sample_prompt,
    split_tokens,
)


def test_default_corpus_is_sizeable_real_text():
    corpus = default_corpus()
    assert corpus.source is None
    assert corpus.num_chars > 200_000
    text = corpus.text
    assert len(text) == corpus.num_chars
    assert "statement" in text and text.count(" the ") > 1000
    assert default_corpus().text == text  # same on every call


def test_load_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.md").write_text("first file\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c").write_text("no suffix\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\xff")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("skip me")
    (tmp_path / "empty.txt").write_text("  \n")

    folder = load_corpus(tmp_path)
    assert folder.documents == ("first file\n", "second file\n", "no suffix\n")
    assert folder.source == str(tmp_path)
    single = load_corpus(tmp_path / "b.txt")
    assert single.documents == ("second file\n",)


def _file(folder, name, data: bytes):
    (folder / name).write_bytes(data)
    return folder / name


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.txt", "data not found"),
        (lambda p: _file(p, "e.txt", b""), "data is empty"),
        (lambda p: _file(p, "w.txt", b" \n\t\n"), "data is empty"),
        (lambda p: p, "no text files"),
        (lambda p: _file(p, "bin.txt", b"ok\xff\xfe"), "not UTF-8"),
    ],
    ids=["missing", "empty-file", "blank-file", "empty-folder", "not-utf8"],
)
def test_bad_data_is_a_clear_error(tmp_path, make, message):
    with pytest.raises(DataError, match=message) as info:
        load_corpus(make(tmp_path))
    assert "\n" not in str(info.value)


def test_split_holds_out_the_tail():
    tokens = torch.arange(1000)
    train, val = split_tokens(tokens, seq_len=10)
    assert val.numel() == 50 and torch.equal(torch.cat([train, val]), tokens)
    train, val = split_tokens(torch.arange(100), seq_len=20)  # 5 % is less than one window
    assert val.numel() == 21
    with pytest.raises(DataError, match="too small"):
        split_tokens(torch.arange(30), seq_len=20)


def test_batches_are_a_function_of_seed_and_position():
    tokens = torch.randint(0, 256, (5000,), dtype=torch.int32)
    a = TokenStream(tokens, seq_len=16, seed=3)
    b = TokenStream(tokens.clone(), seq_len=16, seed=3)
    for first in (0, 8, 800, 12345):  # later positions reach into later epochs
        xa, ya = a.batch(first, 8)
        xb, yb = b.batch(first, 8)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.dtype == torch.long and xa.shape == (8, 16)
        assert torch.equal(xa[:, 1:], ya[:, :-1])
    # a batch equals the concatenation of smaller ones at the same positions
    assert torch.equal(a.batch(10, 6)[0], torch.cat([a.batch(10, 2)[0], a.batch(12, 4)[0]]))
    assert not torch.equal(a.batch(0, 8)[0], TokenStream(tokens, 16, seed=4).batch(0, 8)[0])


def test_an_epoch_visits_every_window_once():
    tokens = torch.arange(1000)
    stream = TokenStream(tokens, seq_len=10, seed=0)
    n = stream.windows_per_epoch
    starts = stream.window_starts(0, n)
    assert len(set(starts.tolist())) == n
    assert (starts.diff().abs() >= 0).all() and starts.min() >= 0
    assert (starts + 11).max() <= 1000
    shift = starts.min().item() % 10
    assert all((s - shift) % 10 == 0 for s in starts.tolist())  # one grid per epoch


def test_fixed_batches_are_stable_and_cover_the_split():
    tokens = torch.arange(500)
    stream = TokenStream(tokens, seq_len=20, seed=0)
    batches = stream.fixed_batches(3, 4)
    assert len(batches) == 3 and all(x.shape == (4, 20) for x, _ in batches)
    assert batches[0][0][0, 0] == 0 and batches[-1][1][-1, -1] == 499
    again = TokenStream(tokens, seq_len=20, seed=99).fixed_batches(3, 4)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(batches, again))


class Positions:
    """A token source as long as a real corpus that holds nothing: id = position."""

    def __init__(self, n: int):
        self.n = n

    def dim(self) -> int:
        return 1

    def numel(self) -> int:
        return self.n

    def windows(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        if starts.min() < 0 or starts.max() + length > self.n:
            raise IndexError(f"a window from {starts.max()} runs past {self.n} tokens")
        return starts[:, None] + torch.arange(length)


@pytest.mark.parametrize("n", [81_767_864, 2**24 + 3, 123_456_789])
def test_fixed_batches_of_a_split_longer_than_float32_counts_end_at_its_end(n):
    stream = TokenStream(Positions(n), seq_len=2048, seed=0)
    batches = stream.fixed_batches(16, 8)
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert starts[0] == 0 and batches[-1][1][-1, -1] == n - 1
    assert (starts.diff() > 0).all()


def test_fixed_batch_starts_are_the_exactly_rounded_even_spacing():
    """Start ``i`` of ``count`` is ``round(i * last / (count - 1))``, halves to even (as
    ``torch.linspace(...).round()`` gave wherever float32 was exact)."""
    for n in (41, 500, 777, 10_000, 1_000_003):
        for num_batches, batch_size in ((1, 1), (1, 2), (3, 4), (5, 7), (16, 8)):
            stream = TokenStream(Positions(n), seq_len=20, seed=0)
            count, last = num_batches * batch_size, n - 21
            got = torch.cat([x[:, 0] for x, _ in stream.fixed_batches(num_batches, batch_size)]).tolist()
            assert got == [round(Fraction(i * last, max(count - 1, 1))) for i in range(count)]
            if n < 100_000:  # where float32 is exact: the batches validation always had
                assert got == (torch.linspace(0, last, count).round().long().tolist() if count > 1 else [0])


def test_too_short_stream_is_a_clear_error():
    with pytest.raises(DataError, match="validation split has 10 tokens"):
        TokenStream(torch.arange(10), seq_len=16, seed=0, what="validation")


def test_fingerprint_tells_streams_apart():
    a = torch.arange(100, dtype=torch.int32)
    assert fingerprint(a) == fingerprint(a.clone())
    b = a.clone()
    b[50] = 7
    assert fingerprint(a) != fingerprint(b)


def test_sample_prompt_picks_the_opening_of_prose():
    text = "ord cut mid-word\n+-----+-----+\n| a   | b   |\n\nHello world, this is a paragraph that goes on\n"
    assert sample_prompt(text) == "Hello world, this is a paragraph that"
    assert sample_prompt("x\nno prose | 1 | 2 |") == "x\nno prose | 1 | 2 |"
    assert sample_prompt("") == "\n"
