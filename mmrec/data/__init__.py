"""Training text: the embedded default corpus, user files, and deterministic batching.

Large corpora are tokenized once into shards (``python -m mmrec.data.prepare``,
:mod:`mmrec.data.shards`), which training reads by memory map.

The batch for a given step depends only on the token stream, the seed and the step
number, never on what ran before, so a run resumed from a checkpoint sees exactly the
batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

__all__ = [
    "Corpus",
    "DataError",
    "TensorTokens",
    "TokenSource",
    "TokenStream",
    "default_corpus",
    "load_corpus",
    "sample_prompt",
    "split_tokens",
]

# Fraction of the token stream (its tail) held out for validation.
VAL_FRACTION = 0.05
# Suffixes read when --data names a folder; anything else in it is skipped.
TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".rst", ".markdown", ".tex", ".org", ""})


class DataError(ValueError):
    """The training data is missing, empty, unreadable or too small."""


@dataclass(frozen=True)
class Corpus:
    """Text documents and where they came from."""

    name: str
    documents: tuple[str, ...]
    source: str | None  # the --data path as given, None for the default corpus

    @property
    def text(self) -> str:
        return "\n\n".join(self.documents)

    @property
    def num_chars(self) -> int:
        return sum(len(d) for d in self.documents) + 2 * max(len(self.documents) - 1, 0)


# --------------------------------------------------------------------------- corpora


def default_corpus() -> Corpus:
    """Real English prose that ships with every CPython: the documentation topics pydoc
    shows for ``help("keywords")`` (the Python Language Reference, about 450 KB).

    Located through the interpreter's own module lookup, so it needs no network and no
    working directory. Distributions that strip ``pydoc_data`` fall back to the
    docstrings of standard-library modules.
    """
    try:
        topics = importlib.import_module("pydoc_data.topics").topics
        docs = tuple(str(topics[k]).strip() for k in sorted(topics) if str(topics[k]).strip())
        if sum(map(len, docs)) > 100_000:
            return Corpus("python-language-reference", docs, None)
    except Exception:  # noqa: BLE001, S110 - any failure here means "use the fallback"
        pass
    docs = _stdlib_docstrings()
    if sum(map(len, docs)) < 20_000:
        raise DataError(
            "the built-in default corpus is not available in this Python installation "
            "(no pydoc_data and no docstrings); pass your own text with --data PATH"
        )
    return Corpus("python-stdlib-docstrings", docs, None)


_FALLBACK_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "email", "enum", "fractions", "functools", "http.client", "inspect",
    "itertools", "json", "logging", "os", "pathlib", "pickle", "random", "re", "shutil",
    "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)


def _stdlib_docstrings() -> tuple[str, ...]:
    docs: list[str] = []
    for name in _FALLBACK_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001, S112 - a module that fails to import is skipped
            continue
        parts = [inspect.getdoc(mod) or ""]
        for attr in sorted(vars(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr)
            if getattr(obj, "__module__", None) == mod.__name__:
                doc = inspect.getdoc(obj)
                if doc:
                    parts.append(f"{attr}\n{doc}")
        text = "\n\n".join(p for p in parts if p).strip()
        if text:
            docs.append(text)
    return tuple(docs)


def load_corpus(path: str | Path | None) -> Corpus:
    """The default corpus for ``None``; else a UTF-8 text file, or every text file
    (``.txt``, ``.md``, ``.rst``, ... or no suffix) under a folder, in sorted order.
    Hidden files and folders are skipped."""
    if path is None:
        return default_corpus()
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data not found: {path} (no such file or directory)")
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(
            f for f in p.rglob("*")
            if f.is_file()
            and f.suffix.lower() in TEXT_SUFFIXES
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not files:
            raise DataError(
                f"no text files in {path} (looked for {', '.join(sorted(s for s in TEXT_SUFFIXES if s))} "
                "or files without a suffix)"
            )
    else:
        raise DataError(f"data is neither a file nor a folder: {path}")

    docs: list[str] = []
    for f in files:
        try:
            raw = f.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {f}: {e.strerror or e}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{f} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        text = text.lstrip("\ufeff")
        if text.strip():
            docs.append(text)
    if not docs:
        what = str(files[0]) if len(files) == 1 and p.is_file() else f"every text file in {path}"
        raise DataError(f"data is empty: {what} holds no text")
    return Corpus(p.name or str(p), tuple(docs), str(path))


# --------------------------------------------------------------------------- batching


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers; stable across runs, platforms and Python versions."""
    h = hashlib.blake2b(":".join(map(str, xs)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


class TokenSource(Protocol):
    """Where a :class:`TokenStream` reads its ids from."""

    def numel(self) -> int: ...

    def windows(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        """``[len(starts), length]`` int64: the ids from each start."""
        ...


class TensorTokens:
    """A 1-D tensor of ids as a :class:`TokenSource` (memory-mapped shards are the other,
    :class:`mmrec.data.shards.TokenShards`)."""

    def __init__(self, tokens: torch.Tensor):
        if tokens.dim() != 1:
            raise ValueError("tokens must be a 1-D tensor")
        self.tokens = tokens

    def numel(self) -> int:
        return self.tokens.numel()

    def windows(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        return self.tokens[starts[:, None] + torch.arange(length)[None, :]].long()


class TokenStream:
    """One token stream cut into windows of ``seq_len + 1`` tokens: a 1-D tensor, or any
    :class:`TokenSource` (memory-mapped shards, :class:`mmrec.data.shards.TokenShards`).

    Each epoch shifts the window grid by a seed-dependent offset and visits the windows
    in a seed-dependent random order, every window once. Sample ``i`` (counting from the
    start of training) is therefore a pure function of ``(tokens, seq_len, seed, i)``.
    """

    def __init__(self, tokens: torch.Tensor | TokenSource, seq_len: int, seed: int, what: str = "data"):
        if isinstance(tokens, torch.Tensor):
            tokens = TensorTokens(tokens)
        n = tokens.numel()
        if n < seq_len + 1:
            raise DataError(
                f"the {what} split has {n} tokens, fewer than train.seq_len + 1 = {seq_len + 1}; "
                "give more text or lower train.seq_len (--set train.seq_len=N)"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self._cached_epoch: tuple[int, int, torch.Tensor] | None = None
        # With room for a shifted grid, shift it by up to seq_len - 1 each epoch.
        if n >= 2 * seq_len + 1:
            self.max_shift = seq_len - 1
            self.windows_per_epoch = (n - 1 - self.max_shift) // seq_len
        else:
            self.max_shift = 0
            self.windows_per_epoch = (n - 1) // seq_len

    def __len__(self) -> int:
        return self.tokens.numel()

    def _epoch(self, epoch: int) -> tuple[int, torch.Tensor]:
        """The grid shift and window order of one epoch (the latest one is cached)."""
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch))
            shift = int(torch.randint(0, self.max_shift + 1, (), generator=g)) if self.max_shift else 0
            self._cached_epoch = (epoch, shift, torch.randperm(self.windows_per_epoch, generator=g))
        return self._cached_epoch[1], self._cached_epoch[2]

    def window_starts(self, first: int, count: int) -> torch.Tensor:
        starts = torch.empty(count, dtype=torch.long)
        for j in range(count):
            epoch, k = divmod(first + j, self.windows_per_epoch)
            shift, order = self._epoch(epoch)
            starts[j] = shift + int(order[k]) * self.seq_len
        return starts

    def batch(self, first: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``first .. first + batch_size - 1`` as ``(inputs, targets)``, int64 ``[B, T]``."""
        chunk = self.tokens.windows(self.window_starts(first, batch_size), self.seq_len + 1)
        return chunk[:, :-1], chunk[:, 1:]

    def fixed_batches(self, num_batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Evenly spaced windows over the whole stream: the same every call (for validation)."""
        count = num_batches * batch_size
        last = len(self) - self.seq_len - 1
        # start i = round(i * last / (count - 1)), halves to even, in integers: exact at any length
        span, steps = torch.arange(count) * last, max(count - 1, 1)
        q, r = span // steps, span % steps
        starts = q + ((2 * r > steps) | ((2 * r == steps) & (q % 2 == 1))).long()
        chunk = self.tokens.windows(starts, self.seq_len + 1)
        return [
            (chunk[i : i + batch_size, :-1], chunk[i : i + batch_size, 1:])
            for i in range(0, count, batch_size)
        ]


def split_tokens(tokens: torch.Tensor, seq_len: int, val_fraction: float = VAL_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """Train on the head, validate on the tail: ``max(val_fraction, seq_len + 1)`` tokens held out."""
    n = tokens.numel()
    n_val = max(int(n * val_fraction), seq_len + 1)
    if n - n_val < seq_len + 1:
        raise DataError(
            f"the data is too small: {n} tokens, and train.seq_len = {seq_len} needs at least "
            f"{2 * (seq_len + 1)} (a training and a validation window); give more text or "
            "lower train.seq_len (--set train.seq_len=N)"
        )
    return tokens[: n - n_val], tokens[n - n_val :]


def fingerprint(tokens: torch.Tensor) -> str:
    """A short hash of a token stream, stored in checkpoints to notice changed data on resume."""
    h = hashlib.blake2b(digest_size=8)
    h.update(str(tokens.dtype).encode())
    t = tokens.contiguous().cpu()
    try:
        h.update(t.numpy().tobytes())
    except RuntimeError:  # torch built without numpy
        h.update(bytes(t.view(torch.uint8).tolist()))
    return h.hexdigest()


def sample_prompt(text: str, max_chars: int = 40) -> str:
    """A prompt for the sample printed after training: the opening words of the first
    line of prose in ``text`` (starts with a letter, at least 20 characters, mostly
    letters and spaces; one that opens a paragraph preferred), cut at a word boundary."""
    lines = text.split("\n")[1:]  # the first line may start mid-word

    def prose(line: str) -> bool:
        line = line.strip()
        letters = sum(c.isalpha() or c == " " for c in line)
        return len(line) >= 20 and line[0].isalpha() and letters >= 0.8 * len(line)

    found = [i for i, line in enumerate(lines) if prose(line)]
    opening = [i for i in found if i == 0 or not lines[i - 1].strip()]
    line = lines[(opening or found)[0]].strip() if found else text.strip()
    if len(line) > max_chars:
        cut = line.rfind(" ", 0, max_chars + 1)
        line = line[: cut if cut > 0 else max_chars]
    return line or text[:max_chars] or "\n"
