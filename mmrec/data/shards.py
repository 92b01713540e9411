"""Token shards on disk: flat, memory-mappable ``.bin`` files of token ids and an
``index.json`` that says how to read them (``python -m mmrec.data.prepare`` writes them).

A shard folder holds::

    index.json         format, dtype, end-of-document id, tokenizer, splits, sources
    tokenizer.json     the tokenizer the ids come from (``tokenizers`` format)
    train_00000.bin    the training split, shard by shard (raw little-endian ids)
    val_00000.bin      the validation split

Each split is one token stream: its shards concatenated in order, every document
followed by the end-of-document token ``eod_id``. Ids are ``uint16`` when the
vocabulary fits (at most 65,536 tokens), else ``uint32``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmrec.data import DataError
from mmrec.tokenizer import BPETokenizer, TokenizerError, load_tokenizer

INDEX_FILE = "index.json"
FORMAT = "mmrec-token-shards"
VERSION = 1
SPLITS = ("train", "val")


class ShardError(DataError):
    """A shard folder is missing, incomplete or not of this format, or ids do not fit it."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_shard_folder(path: str | Path | None) -> bool:
    """Whether ``path`` is a folder of token shards (it holds ``index.json``)."""
    return path is not None and (Path(path).expanduser() / INDEX_FILE).is_file()


# --------------------------------------------------------------------------- writing


class ShardWriter:
    """Appends ids to ``{split}_00000.bin``, ``{split}_00001.bin``, ... of ``shard_tokens``
    ids each (the last one shorter). Every ``write`` goes straight to disk, so memory
    holds one batch, never a shard."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        if shard_tokens < 1:
            raise ValueError("shard_tokens must be positive")
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, np.dtype(dtype), shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self._file = None
        self._hash = None
        self._in_shard = 0

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self._in_shard

    def write(self, ids: np.ndarray, documents: int = 0) -> None:
        """Append ``ids`` (any integer array); an id the dtype cannot hold is refused, so
        that none is ever written wrapped around."""
        ids = np.asarray(ids)
        if ids.size:
            low, high, top = int(ids.min()), int(ids.max()), int(np.iinfo(self.dtype).max)
            if low < 0 or high > top:
                raise ShardError(f"token id {low if low < 0 else high} does not fit {self.dtype.name} shards "
                                 f"(ids 0 to {top}): the dtype was chosen for a smaller vocabulary than the "
                                 "tokenizer's ids reach")
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        self.documents += documents
        while ids.size:
            if self._file is None:
                name = f"{self.split}_{len(self.shards):05d}.bin"
                self._file = open(self.folder / name, "wb")  # noqa: SIM115 - closed in _close_shard
                self._hash = hashlib.blake2b(digest_size=16)
                self._name = name
            take = min(ids.size, self.shard_tokens - self._in_shard)
            chunk = ids[:take].astype("<" + self.dtype.str[1:], copy=False).tobytes()
            self._file.write(chunk)
            self._hash.update(chunk)
            self._in_shard += take
            ids = ids[take:]
            if self._in_shard == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self._file.close()
        self.shards.append({"file": self._name, "tokens": self._in_shard, "blake2b": self._hash.hexdigest()})
        self._file, self._in_shard = None, 0

    def close(self) -> dict[str, Any]:
        """Finish the last shard; the split's entry of the index."""
        if self._file is not None:
            self._close_shard()
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}


def write_index(folder: Path, index: dict[str, Any]) -> None:
    (folder / INDEX_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION, **index}, indent=1) + "\n")


# --------------------------------------------------------------------------- reading


class TokenShards:
    """One split's shards as a single read-only token stream, memory-mapped: nothing is
    read until a window is asked for. A :class:`mmrec.data.TokenSource` (``numel``,
    ``windows``) that also reads by slices; what it returns is int64."""

    def __init__(self, files: list[Path], counts: list[int], dtype: np.dtype):
        self._maps = [np.memmap(f, dtype=dtype, mode="r", shape=(n,)) for f, n in zip(files, counts) if n]
        self._starts = np.cumsum([0] + [m.size for m in self._maps])  # stream offset of each shard
        self.dtype = np.dtype(dtype)

    def dim(self) -> int:
        return 1

    def numel(self) -> int:
        return int(self._starts[-1])

    def __len__(self) -> int:
        return self.numel()

    def read(self, start: int, stop: int) -> np.ndarray:
        """Ids ``start .. stop - 1`` of the stream, across shard boundaries."""
        if not 0 <= start <= stop <= self.numel():
            raise IndexError(f"range {start}:{stop} outside a stream of {self.numel()} tokens")
        parts = []
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            base = int(self._starts[i])
            end = min(stop, int(self._starts[i + 1]))
            parts.append(self._maps[i][start - base : end - base])
            start, i = end, i + 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)

    def __getitem__(self, index: slice) -> torch.Tensor:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("token shards are read by contiguous slices (shards[a:b]) or windows()")
        start, stop, _ = index.indices(self.numel())
        return torch.from_numpy(self.read(start, max(start, stop)).astype(np.int64))

    def windows(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        """``[len(starts), length]`` int64: the ids from each start."""
        out = np.empty((len(starts), length), dtype=np.int64)
        for row, s in enumerate(starts.tolist()):
            out[row] = self.read(s, s + length)
        return torch.from_numpy(out)


@dataclass
class ShardSet:
    """An opened shard folder: both splits, its tokenizer and what the index says."""

    path: Path
    index: dict[str, Any]
    train: TokenShards
    val: TokenShards

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def source(self) -> str:
        return str(self.path)

    @property
    def eod_id(self) -> int:
        return int(self.index["eod_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.index["tokenizer"]["vocab_size"])

    @property
    def fingerprint(self) -> str:
        """A short hash of both splits' contents (from the shard hashes in the index)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(self.index["dtype"].encode())
        for split in SPLITS:
            for shard in self.index["splits"][split]["shards"]:
                h.update(f"{split}:{shard['tokens']}:{shard['blake2b']}".encode())
        return h.hexdigest()

    def tokenizer(self) -> BPETokenizer:
        try:
            tok = load_tokenizer("bpe", self.path)
        except TokenizerError as e:
            raise ShardError(f"{self.path}: {e}") from None
        if tok.vocab_size != self.vocab_size:
            raise ShardError(f"{self.path / 'tokenizer.json'} has {tok.vocab_size} tokens but {INDEX_FILE} says "
                             f"{self.vocab_size}: the folder was changed after it was prepared; prepare it again")
        return tok


def open_shards(path: str | Path) -> ShardSet:
    """Open a shard folder, checking the index and that every shard file is whole."""
    folder = Path(path).expanduser()
    where = folder / INDEX_FILE
    try:
        index = json.loads(where.read_text())
    except FileNotFoundError:
        raise ShardError(f"{folder} is not a folder of token shards (no {INDEX_FILE}); "
                         "make one with python -m mmrec.data.prepare") from None
    except (OSError, ValueError) as e:
        raise ShardError(f"cannot read {where}: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ShardError(f"{where} is not an index of {FORMAT} (format {index.get('format') if isinstance(index, dict) else None!r})")
    if index.get("version") != VERSION:
        raise ShardError(f"{where} is of format version {index.get('version')}, this mmrec reads version {VERSION}; "
                         "prepare the data again")
    try:
        dtype = np.dtype(index["dtype"])
        splits = {}
        for split in SPLITS:
            entry = index["splits"][split]
            files = [folder / s["file"] for s in entry["shards"]]
            counts = [int(s["tokens"]) for s in entry["shards"]]
            for f, n in zip(files, counts):
                size = f.stat().st_size if f.is_file() else None
                if size != n * dtype.itemsize:
                    found = "is missing" if size is None else f"holds {size} bytes"
                    raise ShardError(f"{f} {found}, but {INDEX_FILE} says {n} {dtype.name} tokens "
                                     f"({n * dtype.itemsize} bytes): the folder is incomplete or was changed; "
                                     "prepare it again")
            splits[split] = TokenShards(files, counts, dtype)
        eod_id, vocab_size = int(index["eod_id"]), int(index["tokenizer"]["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{where} is damaged ({type(e).__name__}: {e}); prepare the data again") from None
    if not 0 <= eod_id < vocab_size or token_dtype(vocab_size) != dtype:
        raise ShardError(f"{where} is damaged (eod_id {eod_id}, vocabulary {vocab_size}, dtype {dtype.name}); "
                         "prepare the data again")
    for split, stream in splits.items():
        if stream.numel() == 0:
            raise ShardError(f"{folder}: the {split} split is empty; prepare it again with more documents "
                             "(or another --val-fraction)")
    return ShardSet(folder, index, splits["train"], splits["val"])
