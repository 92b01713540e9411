"""Tokenizers for training: raw UTF-8 bytes (vocabulary 256, nothing to train or save)
or a byte-level BPE trained on the user's text with the ``tokenizers`` package."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import torch

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
    "pieces",
    "require_tokenizers",
    "train_bpe",
    "vocab_size_of",
]

TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer could not be built or loaded."""


class Tokenizer(Protocol):
    kind: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def encode_corpus(self, documents: Iterable[str], separator: str = "\n\n") -> torch.Tensor: ...
    def save(self, directory: str | Path) -> None: ...


class ByteTokenizer:
    """Each UTF-8 byte is a token. Decoding replaces incomplete sequences with U+FFFD."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def encode_corpus(self, documents: Iterable[str], separator: str = "\n\n") -> torch.Tensor:
        data = separator.join(documents).encode("utf-8")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)

    def save(self, directory: str | Path) -> None:
        """Nothing to save: the checkpoint's metadata says ``tokenizer = byte``."""


class BPETokenizer:
    """A byte-level BPE (``tokenizers``); ``tokenizer.json`` loads with
    ``tokenizers.Tokenizer.from_file`` as well.

    Text is only ever text: a special token's string in it (a literal ``<|endoftext|>``)
    is encoded as ordinary tokens, as ``python -m mmrec.data.prepare`` does, and the
    end-of-document id is placed by whoever joins documents."""

    kind = "bpe"

    def __init__(self, tok):  # tok: tokenizers.Tokenizer
        tok.encode_special_tokens = True  # not saved in tokenizer.json: set on every load
        self.backend = tok  # the tokenizers.Tokenizer
        self.vocab_size = vocab_size_of(tok)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids])

    def encode_corpus(self, documents: Iterable[str], separator: str = "\n\n") -> torch.Tensor:
        out: list[int] = []
        for enc in self.backend.encode_batch(pieces(separator.join(documents)), add_special_tokens=False):
            out.extend(enc.ids)
        return torch.tensor(out, dtype=torch.int32)

    def save(self, directory: str | Path) -> None:
        self.backend.save(str(Path(directory) / TOKENIZER_FILE))


def vocab_size_of(tok) -> int:
    """The ids of a ``tokenizers.Tokenizer`` run over ``0 .. vocab_size_of(tok) - 1``: its
    highest id + 1, which is more than its count of tokens when the ids have gaps."""
    return max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1


def pieces(text: str, size: int = 1 << 16) -> list[str]:
    """Cut a long text into pieces of about ``size`` characters so that batch encoding is
    parallel and memory stays bounded. A cut goes right after a newline that stands alone
    between two non-space characters: the byte-level pre-tokenizer puts a boundary on both
    sides of such a newline, so the ids are the same as for the uncut text."""
    out = []
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            nl = text.rfind("\n", start, end)
            while nl > start and (text[nl - 1].isspace() or text[nl + 1].isspace()):
                nl = text.rfind("\n", start, nl)
            if nl > start:
                end = nl + 1
        out.append(text[start:end])
        start = end
    return out


def require_tokenizers(purpose: str = "train.tokenizer = 'bpe'"):
    """The ``tokenizers`` package (an optional dependency), or an error saying how to get it."""
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError(f"{purpose} needs the 'tokenizers' package: pip install tokenizers") from None
    return tokenizers


def train_bpe(documents: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (),
              progress: bool = False) -> BPETokenizer:
    """Train a byte-level BPE with at most ``vocab_size`` tokens: ``special_tokens`` first
    (ids 0, 1, ...), the 256 bytes, then merges (fewer than asked when the text has fewer
    distinct ones). ``documents`` is read once, so it may be a generator."""
    tk = require_tokenizers()
    least = 256 + len(special_tokens)
    if vocab_size < least:
        specials = f" and {len(special_tokens)} special token{'s' * (len(special_tokens) > 1)}" if special_tokens else ""
        raise TokenizerError(f"a byte-level BPE needs a vocabulary of at least {least} (the 256 bytes{specials}), "
                             f"got {vocab_size} (train.bpe_vocab_size, or prepare's --vocab-size)")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(special_tokens),
        show_progress=progress,
    )
    tok.train_from_iterator((p for d in documents for p in pieces(d)), trainer=trainer)
    return BPETokenizer(tok)


def load_tokenizer(kind: str, directory: str | Path | None = None) -> Tokenizer:
    """``byte``, or ``bpe`` from ``directory/tokenizer.json``."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        tk = require_tokenizers()
        if directory is None:
            raise TokenizerError("a BPE tokenizer is loaded from a directory holding tokenizer.json")
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(f"tokenizer file missing: {path}")
        try:
            return BPETokenizer(tk.Tokenizer.from_file(str(path)))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
            raise TokenizerError(f"cannot load the tokenizer {path}: {e}") from None
    raise TokenizerError(f"unknown tokenizer kind {kind!r} (expected 'byte' or 'bpe')")
