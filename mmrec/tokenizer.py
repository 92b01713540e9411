"""Tokenizers for training: raw UTF-8 bytes (vocabulary 256, nothing to train or save)
or a byte-level BPE trained on the user's text with the ``tokenizers`` package."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import torch

__all__ = ["BPETokenizer", "ByteTokenizer", "Tokenizer", "TokenizerError", "load_tokenizer", "train_bpe"]

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
    ``tokenizers.Tokenizer.from_file`` as well."""

    kind = "bpe"

    def __init__(self, tok):  # tok: tokenizers.Tokenizer
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def encode_corpus(self, documents: Iterable[str], separator: str = "\n\n") -> torch.Tensor:
        out: list[int] = []
        pieces = _pieces(separator.join(documents))
        for enc in self._tok.encode_batch(pieces, add_special_tokens=False):
            out.extend(enc.ids)
        return torch.tensor(out, dtype=torch.int32)

    def save(self, directory: str | Path) -> None:
        self._tok.save(str(Path(directory) / TOKENIZER_FILE))


def _pieces(text: str, size: int = 1 << 16) -> list[str]:
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


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError(
            "train.tokenizer = 'bpe' needs the 'tokenizers' package: pip install tokenizers"
        ) from None
    return tokenizers


def train_bpe(documents: Sequence[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE with at most ``vocab_size`` tokens (at least the 256 bytes;
    fewer than asked when the text has fewer distinct merges)."""
    tk = _require_tokenizers()
    if vocab_size < 256:
        raise TokenizerError(f"train.bpe_vocab_size must be at least 256 (the byte alphabet), got {vocab_size}")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator((p for d in documents for p in _pieces(d)), trainer=trainer)
    return BPETokenizer(tok)


def load_tokenizer(kind: str, directory: str | Path | None = None) -> Tokenizer:
    """``byte``, or ``bpe`` from ``directory/tokenizer.json``."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        tk = _require_tokenizers()
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
