"""Tokenize a corpus once into token shards: ``python -m mmrec.data.prepare``.

::

    python -m mmrec.data.prepare --input texts/ --out data/texts --vocab-size 32000
    python -m mmrec.data.prepare --input src/ --glob '*.py' --glob '*.md' --out data/code
    python -m mmrec.data.prepare --input dump.jsonl --text-field content --tokenizer gpt2/tokenizer.json --out data/x
    python -m mmrec.recipes.train --recipe small --data data/texts

Inputs (``--input``, repeatable) are UTF-8 text files (one document each), ``.jsonl``
files (one document a line, its ``--text-field``), folders (every file under them whose
name or relative path matches a ``--glob``, in sorted order; hidden files and folders
skipped; files that are not UTF-8 skipped and counted), and Hugging Face ``datasets``
saved with ``save_to_disk`` (its ``--text-field``; needs ``pip install datasets``).

The tokenizer is a byte-level BPE trained on the inputs (``--tokenizer bpe``, the
default, ``--vocab-size`` tokens including the end-of-document token), the 256 bytes
alone (``--tokenizer byte``: 257 tokens with the end-of-document token), or a
``tokenizer.json`` given by path, used as is (its ``--eod-token`` must be in it). It is
written beside the shards as ``tokenizer.json``. Special tokens never come from the
text: a literal ``<|endoftext|>`` in a document is encoded as ordinary text.

Documents are read, tokenized and written in batches of about ``--batch-bytes`` of text,
so memory holds a batch (and the largest single document), never the corpus; training a
BPE holds its word counts (``--tokenizer-train-bytes`` caps the text it sees). Every
``round(1 / --val-fraction)``-th document, evenly spread, goes to the validation split.
See :mod:`mmrec.data.shards` for the layout.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

import mmrec
from mmrec import atomic
from mmrec.data import DataError
from mmrec.data.shards import (
    INDEX_FILE,
    ShardWriter,
    is_shard_folder,
    token_dtype,
    write_index,
)
from mmrec.tokenizer import (
    TOKENIZER_FILE,
    TokenizerError,
    pieces,
    require_tokenizers,
    train_bpe,
    vocab_size_of,
)

DEFAULT_GLOBS = ("*.txt", "*.text", "*.md", "*.rst", "*.markdown", "*.tex", "*.org", "*.jsonl")
EOD_TOKEN = "<|endoftext|>"
# A UTF-16 surrogate code point in a str is a lone one (a JSON "\ud800" escape): not text.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class PrepareError(DataError):
    """Bad input to ``prepare``: the message says what and how to fix it."""


# --------------------------------------------------------------------------- inputs


@dataclass
class Source:
    """One ``--input`` and what was read from it."""

    path: Path
    kind: str  # "text", "jsonl", "folder" or "dataset"
    files: list[Path] = field(default_factory=list)  # a folder's files, in reading order
    documents: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # files of a folder that could not be read as UTF-8
    surrogates_replaced: int = 0  # .jsonl documents whose lone surrogates became U+FFFD
    first_surrogate: str | None = None  # where the first of them is: "file:line"

    def summary(self) -> dict:
        out = {"path": str(self.path.resolve()), "kind": self.kind, "documents": self.documents, "bytes": self.bytes,
               "surrogates_replaced": self.surrogates_replaced}
        if self.kind == "folder":
            out["files"] = len(self.files)
            out["skipped_files"] = len(self.skipped)
        return out


def is_dataset_folder(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                      and (path / "dataset_info.json").is_file())


def find_sources(inputs: list[str], globs: list[str]) -> list[Source]:
    sources = []
    for given in inputs:
        path = Path(given).expanduser()
        if not path.exists():
            raise PrepareError(f"--input {given}: no such file or folder")
        if path.is_file():
            sources.append(Source(path, "jsonl" if path.suffix.lower() == ".jsonl" else "text"))
        elif is_dataset_folder(path):
            sources.append(Source(path, "dataset"))
        else:
            files = list_files(path, globs)
            if not files:
                raise PrepareError(f"--input {given}: no file under it matches {' '.join(globs)} (choose files with --glob)")
            sources.append(Source(path, "folder", files))
    return sources


def list_files(folder: Path, globs: list[str]) -> list[Path]:
    """Files under ``folder`` whose name or relative path matches a glob; sorted walk,
    hidden files and folders left out."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(rel, g) for g in globs) and path.is_file():
                found.append(path)
    return found


def read_documents(sources: list[Source], text_field: str, dataset_split: str, bar: tqdm | None = None) -> Iterator[str]:
    """Every non-blank document of every source, in order; counts go into the sources."""
    for src in sources:
        src.documents = src.bytes = src.surrogates_replaced = 0
        src.skipped, src.first_surrogate = [], None
        if src.kind == "dataset":
            docs = _dataset_documents(src.path, text_field, dataset_split)
        elif src.kind == "folder":
            docs = _folder_documents(src, text_field, bar)
        elif src.kind == "jsonl":
            docs = _jsonl_documents(src, src.path, text_field, bar)
        else:
            docs = iter([_read_text(src.path, bar)])
        for doc in docs:
            if doc.strip():
                src.documents += 1
                src.bytes += len(doc.encode("utf-8"))
                yield doc


def _read_text(path: Path, bar: tqdm | None) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PrepareError(f"cannot read {path}: {e.strerror or e}") from None
    if bar is not None:
        bar.update(len(raw))
    try:
        return raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def _folder_documents(src: Source, text_field: str, bar: tqdm | None) -> Iterator[str]:
    for path in src.files:
        if path.suffix.lower() == ".jsonl":
            yield from _jsonl_documents(src, path, text_field, bar)
            continue
        try:
            yield _read_text(path, bar)
        except PrepareError:  # a folder's unreadable or binary file is left out, and counted
            src.skipped.append(str(path))


def _jsonl_documents(src: Source, path: Path, text_field: str, bar: tqdm | None) -> Iterator[str]:
    """The ``text_field`` of each line; lone surrogates (valid JSON, not text: no
    tokenizer takes them) are replaced with U+FFFD and counted in ``src``."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after the generator is done
    except OSError as e:
        raise PrepareError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for number, line in enumerate(f, 1):
            if bar is not None:
                bar.update(len(line))
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise PrepareError(f"{path}:{number} is not a JSON line ({e})") from None
            if not isinstance(record, dict) or text_field not in record:
                fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise PrepareError(f"{path}:{number} has no {text_field!r} field (it has: {fields}); "
                                   "name the text's field with --text-field")
            text = record[text_field]
            if not isinstance(text, str):
                raise PrepareError(f"{path}:{number}: field {text_field!r} is {type(text).__name__}, not text")
            if LONE_SURROGATE.search(text):
                text = LONE_SURROGATE.sub("\ufffd", text)
                src.surrogates_replaced += 1
                src.first_surrogate = src.first_surrogate or f"{path}:{number}"
            yield text


def _dataset_documents(path: Path, text_field: str, split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise PrepareError(f"--input {path} is a Hugging Face dataset saved on disk, which needs the 'datasets' "
                           "package: pip install datasets") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise PrepareError(f"--input {path} has the splits {', '.join(ds)}, not {split!r}; choose one with --dataset-split")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise PrepareError(f"--input {path} has no column {text_field!r} (it has: {', '.join(ds.column_names)}); "
                           "name the text's column with --text-field")
    for batch in ds.select_columns([text_field]).iter(batch_size=1024):
        for text in batch[text_field]:
            if text is not None and not isinstance(text, str):
                raise PrepareError(f"--input {path}: column {text_field!r} holds {type(text).__name__}, not text")
            yield text or ""


# --------------------------------------------------------------------------- tokenizers


def load_tokenizer_file(given: str):
    """A ``tokenizer.json`` (or a folder holding one), loaded as is."""
    tk = require_tokenizers("preparing shards")
    path = Path(given).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise PrepareError(f"--tokenizer {given}: no such file (expected bpe, byte, or a tokenizer.json)")
    try:
        return tk.Tokenizer.from_file(str(path)), path
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
        raise PrepareError(f"--tokenizer {given}: cannot load it ({e})") from None


def _take(documents: Iterator[str], max_bytes: int) -> Iterator[str]:
    """The leading documents up to about ``max_bytes`` of UTF-8 (all of them for 0)."""
    seen = 0
    for doc in documents:
        yield doc
        seen += len(doc.encode("utf-8"))
        if max_bytes and seen >= max_bytes:
            return


# --------------------------------------------------------------------------- writing


def _batches(documents: Iterator[str], batch_bytes: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in documents:
        batch.append(doc)
        size += len(doc)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def can_cut(tok) -> bool:
    """Whether cutting a text after a lone newline leaves its ids unchanged: true of a
    byte-level pre-tokenizer with its regex and no prefix space (GPT-2's, and ours),
    which splits there anyway."""
    pre = tok.pre_tokenizer
    tk = require_tokenizers("preparing shards")
    return (isinstance(pre, tk.pre_tokenizers.ByteLevel) and pre.use_regex and not pre.add_prefix_space
            and tok.normalizer is None)


def encode_documents(tok, documents: list[str], eod_id: int, cut: bool = False) -> list[np.ndarray]:
    """Each document's ids followed by ``eod_id`` (int64). With ``cut`` (see ``can_cut``)
    long documents are encoded in pieces, so that a batch of a few long documents still
    runs on every core."""
    texts, owner = [], []
    for i, doc in enumerate(documents):
        for piece in pieces(doc) if cut else [doc]:
            texts.append(piece)
            owner.append(i)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    ids: list[list[np.ndarray]] = [[] for _ in documents]
    for i, enc in zip(owner, encode(texts, add_special_tokens=False)):
        ids[i].append(np.asarray(enc.ids, dtype=np.int64))
    end = np.array([eod_id], dtype=np.int64)
    return [np.concatenate([*parts, end]) for parts in ids]


def write_shards(tok, documents: Iterator[str], eod_id: int, folder: Path, dtype: np.dtype,
                 args: argparse.Namespace) -> tuple[dict, int]:
    """Tokenize ``documents`` batch by batch into both splits' shards; the splits' index
    entries and the number of documents."""
    writers = {split: ShardWriter(folder, split, dtype, args.shard_tokens) for split in ("train", "val")}
    count, cut = 0, can_cut(tok)
    for batch in _batches(documents, args.batch_bytes):
        parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        for ids in encode_documents(tok, batch, eod_id, cut):
            parts["val" if is_validation(count, args.val_fraction) else "train"].append(ids)
            count += 1
        for split, arrays in parts.items():
            if arrays:
                writers[split].write(np.concatenate(arrays), documents=len(arrays))
    return {split: w.close() for split, w in writers.items()}, count


def is_validation(i: int, val_fraction: float) -> bool:
    """Document ``i`` (from 0) is held out: a fraction ``val_fraction`` of the documents,
    evenly spread (the first at ``round(1 / val_fraction) - 1``)."""
    return math.floor((i + 1) * val_fraction + 1e-9) > math.floor(i * val_fraction + 1e-9)


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that holds anything, unless ``overwrite`` and it is a shard folder."""
    if out.exists():
        if not out.is_dir():
            raise PrepareError(f"--out {out} is a file; choose a folder")
        if any(out.iterdir()):
            if not overwrite:
                raise PrepareError(f"--out {out} already exists and is not empty; pass --overwrite to replace it, "
                                   "or choose another --out")
            if not is_shard_folder(out):
                raise PrepareError(f"--overwrite replaces a folder of token shards, but {out} holds other files "
                                   f"(no {INDEX_FILE}); choose another --out")


def check_options(args: argparse.Namespace) -> None:
    """The numeric options, before any reading (training a tokenizer can take hours)."""
    if not 0 < args.val_fraction < 1:
        raise PrepareError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.shard_tokens < 1:
        raise PrepareError(f"--shard-tokens must be at least 1, got {args.shard_tokens}")
    if args.batch_bytes < 1:
        raise PrepareError(f"--batch-bytes must be at least 1, got {args.batch_bytes}")
    if args.tokenizer_train_bytes < 0:
        raise PrepareError(f"--tokenizer-train-bytes must be 0 (all) or more, got {args.tokenizer_train_bytes}")
    if args.tokenizer == "bpe" and args.vocab_size < 257:
        raise PrepareError(f"--vocab-size must be at least 257 (the 256 bytes and the end-of-document token), "
                           f"got {args.vocab_size}")


def prepare(args: argparse.Namespace) -> dict:
    """Write the shard folder ``args.out``; its index."""
    started = time.perf_counter()
    check_options(args)
    globs = args.glob or list(DEFAULT_GLOBS)
    out = Path(args.out).expanduser()
    check_output(out, args.overwrite)  # before any work
    sources = find_sources(args.input, globs)
    total = None if any(s.kind == "dataset" for s in sources) else sum(
        f.stat().st_size for s in sources for f in (s.files or [s.path]))

    def documents(desc: str) -> Iterator[str]:
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, dynamic_ncols=True, disable=args.quiet)
        with bar:
            yield from read_documents(sources, args.text_field, args.dataset_split, bar)

    # the tokenizer: trained on a first pass, or loaded
    tokenizer_info: dict = {"file": TOKENIZER_FILE}
    loaded_from = None
    if args.tokenizer == "bpe":
        tok = train_bpe(_take(documents("reading for the tokenizer"), args.tokenizer_train_bytes),
                        args.vocab_size, special_tokens=[args.eod_token], progress=not args.quiet).backend
        tokenizer_info.update(kind="bpe", requested_vocab_size=args.vocab_size,
                              trained_on_bytes=sum(s.bytes for s in sources))
    elif args.tokenizer == "byte":  # the byte alphabet needs no text
        tok = train_bpe([], 257, special_tokens=[args.eod_token]).backend
        tokenizer_info.update(kind="byte")
    else:
        tok, loaded_from = load_tokenizer_file(args.tokenizer)
        tokenizer_info.update(kind="loaded", loaded_from=str(loaded_from.resolve()))
    eod_id = tok.token_to_id(args.eod_token)
    if eod_id is None:
        raise PrepareError(f"the tokenizer has no token {args.eod_token!r} to end documents with; name its "
                           "end-of-document token with --eod-token (e.g. '</s>')")
    tok.encode_special_tokens = True  # special tokens come from here, never from the text
    vocab_size = vocab_size_of(tok)  # the highest id + 1: ids may have gaps
    tokenizer_info["vocab_size"] = vocab_size
    dtype = token_dtype(vocab_size)

    check_output(out, args.overwrite)  # again: the tokenizer may have taken long
    out.parent.mkdir(parents=True, exist_ok=True)
    # written into a hidden folder beside out, which becomes out when done (mmrec.atomic);
    # shards are not fsynced: a crash costs a run of prepare again, never a half folder
    with atomic.replacing(out, out.parent / f".{out.name}.partial", durable=False) as work:
        work.mkdir()
        if loaded_from is not None:
            shutil.copyfile(loaded_from, work / TOKENIZER_FILE)  # byte for byte: used as is
        else:
            tok.save(str(work / TOKENIZER_FILE))
        splits, count = write_shards(tok, documents("tokenizing"), eod_id, work, dtype, args)
        if count == 0:
            raise PrepareError("the inputs hold no text (every document is empty)")
        if splits["val"]["tokens"] == 0:
            raise PrepareError(f"{count} documents leave none for validation at --val-fraction {args.val_fraction}; "
                               f"raise it to at least {1 / count:.3g} or give more documents")
        result = {
            "dtype": dtype.name,
            "eod_id": eod_id,
            "eod_token": args.eod_token,
            "tokenizer": tokenizer_info,
            "splits": splits,
            "documents": count,
            "input_bytes": sum(s.bytes for s in sources),
            "val_fraction": args.val_fraction,
            "shard_tokens": args.shard_tokens,
            "globs": globs,
            "text_field": args.text_field,
            "sources": [s.summary() for s in sources],
            "mmrec_version": mmrec.__version__,
            "seconds": round(time.perf_counter() - started, 1),
        }
        write_index(work, result)
    skipped = [f for s in sources for f in s.skipped]
    if skipped:
        print(f"skipped {len(skipped)} files that are not UTF-8 text or could not be read (e.g. {skipped[0]})",
              file=sys.stderr)
    replaced = [s for s in sources if s.surrogates_replaced]
    if replaced:
        print(f"replaced lone surrogates with U+FFFD in {sum(s.surrogates_replaced for s in replaced)} documents "
              f"(JSON escapes \\ud800 to \\udfff that are not text; the first at {replaced[0].first_surrogate})",
              file=sys.stderr)
    return result


def describe(out: Path, index: dict) -> str:
    s = index["splits"]
    return (f"{out}: {index['documents']:,} documents, {index['input_bytes'] / 1e6:,.1f} MB of text -> "
            f"{s['train']['tokens']:,} training and {s['val']['tokens']:,} validation tokens "
            f"({len(s['train']['shards'])} + {len(s['val']['shards'])} shards of {index['dtype']}); "
            f"vocabulary {index['tokenizer']['vocab_size']}, end of document {index['eod_token']!r} = id "
            f"{index['eod_id']}; {index['seconds']:.0f} s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mmrec.data.prepare",
                                description="Tokenize text into memory-mappable token shards for training.")
    p.add_argument("--input", action="append", required=True, metavar="PATH",
                   help="a text file, a .jsonl file, a folder, or a datasets folder (save_to_disk); repeatable")
    p.add_argument("--out", required=True, metavar="DIR", help="the shard folder to write")
    p.add_argument("--glob", action="append", metavar="PATTERN",
                   help=f"files of a folder to read, by name or relative path; repeatable (default: {' '.join(DEFAULT_GLOBS)})")
    p.add_argument("--text-field", default="text", help="the text's field in .jsonl lines and datasets (default text)")
    p.add_argument("--dataset-split", default="train", help="the split of a saved DatasetDict (default train)")
    p.add_argument("--tokenizer", default="bpe",
                   help="bpe (train a byte-level BPE, default), byte (the 256 bytes), or a tokenizer.json used as is")
    p.add_argument("--vocab-size", type=int, default=32000, help="BPE vocabulary, end-of-document token included (default 32000)")
    p.add_argument("--tokenizer-train-bytes", type=int, default=0, metavar="N",
                   help="train the BPE on the first N bytes of text only (default 0: all)")
    p.add_argument("--eod-token", default=EOD_TOKEN, help=f"the end-of-document token (default {EOD_TOKEN})")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of the documents held out (default 0.01)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens a shard file (default 100M)")
    p.add_argument("--batch-bytes", type=int, default=4_000_000, help="text tokenized at a time (default 4 MB)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it is a shard folder already")
    p.add_argument("--quiet", action="store_true", help="no progress bars (what was skipped or replaced is still said)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        index = prepare(args)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(Path(args.out), index))
    return 0


if __name__ == "__main__":
    sys.exit(main())
